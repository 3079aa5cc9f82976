"""Measure, on the CPU, the per-token memory constants that scripts/memory_plan.py uses for Qwen2.5-VL-7B.

    python scripts/bench_memory.py                 # ~2-3 minutes on 2 idle cores, < 8 GiB of RAM
    python scripts/bench_memory.py --json out.json

Everything runs at the 7B's real widths: vocabulary 152064, hidden 3584, intermediate 18944, 28 heads / 4 KV
heads; weights are random (memory does not depend on their values). Each configuration runs in a fresh
subprocess and reports its peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the high-water
mark of the whole process) minus its resident memory once the inputs exist, so allocator caches and the import
of torch cancel out. Two or three lengths give a slope (MB per token) and an intercept (MB).

(a) The logits path, with a bf16 head and bf16 hidden states (FSDP2's bf16 parameters) and fp32 log-softmax,
    as a GPU runs it. The old way (what rl.py did before common.token_logprobs): full [T, V] logits,
    log_softmax, entropy, backward. The new way: `common.token_logprobs(..., chunk_size=512,
    with_entropy=True)`, each chunk under activation checkpointing: its peak must not grow with T. Then, in
    fp32, the new way's log-probs, entropy and gradients must equal the old way's within 1e-5 (allclose).
(b) One decoder layer's activations per token, with and without gradient checkpointing: the bytes autograd
    saves for backward (counted exactly with saved-tensor hooks, fp32 and bf16), and the peak of a whole
    forward + backward (RSS, bf16).

Prints a table and the constants for memory_plan.py (which turns them into GiB for a batch); `--json` also
writes every number. This is a benchmark, not a test.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, HIDDEN = 152064, 3584  # Qwen2.5-VL-7B-Instruct
MB = 1e6


def rss_mb() -> float:
    """Resident memory now (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_mb() -> float:
    """Resident high-water mark of this process (MB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


# ----------------------------------------------------------------------------------------------------
# Workers: one configuration each, in a fresh process (so each high-water mark is its own)


def old_logprobs(hidden, weight, targets, temperature=1.0):
    """rl.py before issue 13: the whole [T, V] distribution at once."""
    logits = hidden @ weight.t()  # [T, V]
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # [T, V]
    logp = logp_all.gather(-1, targets[:, None])[:, 0]  # [T]
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [T]
    return logp, entropy


def logits_inputs(T: int, dtype, exact: bool, weight_grad: bool = True, seed: int = 0):
    """LM head [V, H], hidden [T, H], targets [T] and per-token loss weights. exact=False fills the head with
    one random [128, H] block repeated (memory does not depend on the values; saves seconds of sampling)."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        weight = torch.empty(VOCAB, HIDDEN, dtype=dtype).uniform_(-0.035, 0.035, generator=g)
    else:
        weight = torch.empty(VOCAB, HIDDEN, dtype=dtype)
        block = torch.empty(128, HIDDEN).uniform_(-0.035, 0.035, generator=g).to(dtype)
        weight.view(VOCAB // 128, 128, HIDDEN).copy_(block.expand(VOCAB // 128, 128, HIDDEN))
    weight.requires_grad_(weight_grad)
    hidden = torch.empty(T, HIDDEN).normal_(0, 1.0, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (T,), generator=g)
    coef = torch.empty(T).normal_(generator=g)  # a loss that weights every token differently
    return weight, hidden, targets, coef


def worker_logits(way: str, T: int) -> dict:
    """Peak of log-probs + entropy + backward for T tokens above the inputs, in bf16 as the GPU runs it
    (bf16 head and hidden states from FSDP2's bf16 parameters; log-softmax in fp32). The old way's head
    gradient is left out (T-independent; memory_plan.py counts it with the gradients) so the slope is clean."""
    import common

    weight, hidden, targets, coef = logits_inputs(T, torch.bfloat16, exact=False, weight_grad=way != "old")
    base = rss_mb()
    t0 = time.time()
    if way == "old":
        logp, ent = old_logprobs(hidden, weight, targets)
    else:
        logp, ent = common.token_logprobs(hidden, weight, targets, 1.0, chunk_size=512, with_entropy=True)
    (logp * coef).sum().backward()
    return {"way": way, "T": T, "peak_above_inputs_mb": peak_mb() - base, "seconds": time.time() - t0,
            "head_grad_mb": weight.numel() * weight.element_size() / MB}


def worker_logits_equal(T: int, chunk_size: int) -> dict:
    """Chunked vs full in fp32: log-probs, entropy and both gradients (the chunking logic does not depend
    on the chunk size; a small one keeps this check to seconds)."""
    import common

    weight, hidden, targets, coef = logits_inputs(T, torch.float32, exact=True, seed=1)
    logp_c, ent_c = common.token_logprobs(hidden, weight, targets, 0.7, chunk_size=chunk_size, with_entropy=True)
    (logp_c * coef).sum().backward()
    gw_c, gh_c = weight.grad, hidden.grad
    weight.grad = hidden.grad = None
    logp_o, ent_o = old_logprobs(hidden, weight, targets, 0.7)
    (logp_o * coef).sum().backward()

    out = {"T": T, "chunk_size": chunk_size}
    for k, (x, y) in {"logprobs": (logp_c, logp_o), "entropy": (ent_c, ent_o), "grad_hidden": (gh_c, hidden.grad),
                      "grad_weight": (gw_c, weight.grad)}.items():
        x, y = x.detach(), y.detach()
        out[k] = {"abs": (x - y).abs().max().item(), "rel": ((x - y).abs().max() / y.abs().max()).item(),
                  "allclose": torch.allclose(x, y, rtol=1e-5, atol=1e-5)}
    return out


def decoder_layer(dtype):
    """One Qwen2.5-VL-7B decoder layer (real widths, sdpa attention) and its rotary embedding."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLDecoderLayer,
                                                                     Qwen2_5_VLRotaryEmbedding)

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from memory_plan import PRESETS

    config = Qwen2_5_VLConfig.from_dict({**PRESETS["qwen2.5-vl-7b"], "num_hidden_layers": 1})
    text = config.text_config
    text._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen2_5_VLDecoderLayer(text, 0).to(dtype)
    rotary = Qwen2_5_VLRotaryEmbedding(text)
    return layer, rotary


def layer_inputs(layer, rotary, T, dtype):
    x = torch.empty(1, T, HIDDEN, dtype=dtype).normal_().requires_grad_()  # the previous layer's output
    pos = torch.arange(T)[None].expand(3, 1, T)  # text tokens: the three M-RoPE rows are equal
    cos, sin = rotary(x, pos)  # [3?, 1, T, 128] -> what the model passes to every layer
    return x, (cos, sin)


def run_layer(layer, x, pe, ckpt: bool):
    # attention_mask None: sdpa's causal kernel, no [T, T] mask (what flash attention does on a GPU)
    if ckpt:
        from torch.utils.checkpoint import checkpoint
        return checkpoint(layer, x, None, None, position_embeddings=pe, use_reentrant=False)
    return layer(x, None, None, position_embeddings=pe)


def worker_layer_saved(dtype_name: str, T: int) -> dict:
    """Bytes autograd keeps for backward after one layer's forward (parameters excluded), with and without
    checkpointing, counted exactly: each saved tensor's storage once."""
    dtype = getattr(torch, dtype_name)
    layer, rotary = decoder_layer(dtype)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    out = {"dtype": dtype_name, "T": T}
    for ckpt in (False, True):
        x, pe = layer_inputs(layer, rotary, T, dtype)
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = run_layer(layer, x, pe, ckpt)
        out["ckpt" if ckpt else "no_ckpt"] = sum(seen.values()) / T / MB  # MB per token
        del y
    return out


def worker_layer_peak(dtype_name: str, T: int, ckpt: bool) -> dict:
    """Peak of one layer's forward + backward above its inputs (RSS), and what the forward leaves alive."""
    dtype = getattr(torch, dtype_name)
    layer, rotary = decoder_layer(dtype)
    for p in layer.parameters():  # gradients pre-made, so the peak is activations only
        p.grad = torch.zeros_like(p).fill_(0.0)
    x, pe = layer_inputs(layer, rotary, T, dtype)
    base = rss_mb()
    y = run_layer(layer, x, pe, ckpt)
    after_forward = rss_mb() - base
    y.float().pow(2).mean().backward()
    return {"dtype": dtype_name, "T": T, "ckpt": ckpt, "after_forward_mb": after_forward,
            "peak_above_inputs_mb": peak_mb() - base}


# ----------------------------------------------------------------------------------------------------
# Driver


def spawn(*args) -> dict:
    # every allocation >= 128 KiB gets its own mapping, returned to the system when freed: the resident size
    # then follows live tensors instead of the allocator's free lists
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"worker {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(points):
    """Least-squares line through (x, y): slope, intercept."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {"logits": lambda w, T: worker_logits(w, int(T)),
              "equal": lambda T, c: worker_logits_equal(int(T), int(c)),
              "saved": lambda d, T: worker_layer_saved(d, int(T)),
              "peak": lambda d, T, c: worker_layer_peak(d, int(T), c == "1")}[kind]
        print(json.dumps(fn(*rest)))
        return

    t_start = time.time()
    res = {"vocab": VOCAB, "hidden": HIDDEN}
    print(f"(a) logits path at vocab {VOCAB}, hidden {HIDDEN}, bf16 head and hidden states, fp32 log-softmax")
    old = [spawn("logits", "old", T) for T in (256, 512, 768)]
    for r in old:
        print(f"  old way  T={r['T']:5d}  peak above inputs {r['peak_above_inputs_mb']:8.0f} MB  ({r['seconds']:.0f} s)")
    slope, icpt = fit([(r["T"], r["peak_above_inputs_mb"]) for r in old])
    chunked = [spawn("logits", "chunked", T) for T in (640, 1088)]  # 2 and 3 chunks of <= 512
    for r in chunked:
        print(f"  chunked  T={r['T']:5d}  peak above inputs {r['peak_above_inputs_mb']:8.0f} MB  ({r['seconds']:.0f} s)")
    flat = [r["peak_above_inputs_mb"] for r in chunked]
    head = chunked[0]["head_grad_mb"]
    # From the 2nd chunk on, the peak holds the head's gradient and one more [V, H] gradient being added into
    # it; the rest is one chunk's [512, V] tensors, counted in fp32 rows (what memory_plan.py multiplies by).
    chunk_tensors = max(flat) - 2 * head
    rows = chunk_tensors * MB / (512 * VOCAB * 4)
    eq = spawn("equal", 200, 64)
    diffs = {k: eq[k] for k in ("logprobs", "entropy", "grad_hidden", "grad_weight")}
    # torch.allclose(rtol=1e-5, atol=1e-5): entropy (~12 nats here) sums 152064 fp32 terms in another order
    ok = all(d.get("allclose", d["abs"] <= 1e-5 + 1e-5 * d["abs"] / max(d["rel"], 1e-30)) for d in diffs.values())
    res["logits"] = {"old_mb_per_token": slope, "old_intercept_mb": icpt, "old_points": old,
                     "chunked_points": chunked, "chunked_peak_mb": max(flat), "chunked_growth_mb": flat[-1] - flat[0],
                     "head_grad_bf16_mb": head, "chunk_tensors_mb": chunk_tensors, "chunk_fp32_vocab_rows": rows,
                     "equal_check": eq, "equal_within_1e-5": ok}
    print(f"  old way: {slope:.3f} MB per token (intercept {icpt:+.0f} MB), plus the head's gradient")
    print(f"  chunked: {max(flat):.0f} MB whatever T ({flat[-1] - flat[0]:+.0f} MB from 640 to 1088 tokens) ="
          f" 2 x head gradient ({head:.0f} MB) + one chunk's tensors {chunk_tensors:.0f} MB"
          f" (= {rows:.2f} x [512, V] in fp32)")
    print(f"  chunked vs full (fp32, {eq['T']} tokens in chunks of {eq['chunk_size']}), max |diff|: "
          + ", ".join(f"{k} {d['abs']:.1e} (rel {d['rel']:.0e})" for k, d in diffs.items())
          + ("  -> equal within 1e-5 (allclose)" if ok else "  -> NOT equal within 1e-5"))

    print(f"\n(b) one decoder layer of the 7B (hidden {HIDDEN}, intermediate 18944, sdpa causal), per token")
    saved = {d: spawn("saved", d, 512) for d in ("float32", "bfloat16")}
    for d, r in saved.items():
        print(f"  saved for backward ({d:8s}, exact): {r['no_ckpt']:.4f} MB without checkpointing, {r['ckpt']:.4f} with")
    peaks = {}
    for ckpt in (False, True):
        pts = [spawn("peak", "bfloat16", T, int(ckpt)) for T in (256, 768)]
        s, i = fit([(r["T"], r["peak_above_inputs_mb"]) for r in pts])
        sf, fi = fit([(r["T"], r["after_forward_mb"]) for r in pts])
        peaks["ckpt" if ckpt else "no_ckpt"] = {"peak_mb_per_token": s, "peak_intercept_mb": i,
                                                "after_forward_mb_per_token": sf, "after_forward_intercept_mb": fi,
                                                "points": pts}
        print(f"  bf16 RSS, {'with   ' if ckpt else 'without'} checkpointing: after forward {sf:.4f} MB, forward+backward "
              f"peak {s:.4f} MB (+ {i:.0f} MB: the weight-gradient buffers)")
    res["layer"] = {"saved": saved, "peak": peaks}
    res["constants"] = {
        "ACT_LAYER_SAVED_MB": peaks["no_ckpt"]["after_forward_mb_per_token"],
        "ACT_CKPT_SAVED_MB": peaks["ckpt"]["after_forward_mb_per_token"],
        "ACT_LAYER_PEAK_MB": max(peaks["no_ckpt"]["peak_mb_per_token"], peaks["ckpt"]["peak_mb_per_token"]),
        "LOGITS_CHUNK_FP32_ROWS": rows, "OLD_LOGITS_MB": slope}
    res["seconds"] = time.time() - t_start
    print(f"\nconstants for memory_plan.py ({res['seconds']:.0f} s): "
          + ", ".join(f"{k} = {v:.4g}" for k, v in res["constants"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    sys.path.insert(0, ROOT)
    main()
