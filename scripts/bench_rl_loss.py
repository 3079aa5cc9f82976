"""The GRPO loss pass, padded against packed: padding fraction, tokens per second, and equal math.

    OMP_NUM_THREADS=1 python scripts/bench_rl_loss.py                  # 64 sequences, 2 reps
    python scripts/bench_rl_loss.py --num_sequences 32 --max_completion 2048 --reps 1   # quicker

One synthetic GRPO step: prompts of 50..300 tokens, completions drawn like R1-style responses
(lognormal, median ~900 tokens, clipped to 200..4096), random advantages and reference log-probs. A
small random Qwen2 text model built here (no download) runs forward + backward of the whole step
with rl.py's own functions (`microbatches`, `collate`, `completion_logprobs`, `policy_loss`) in
float32, once per path, the paths alternating:

  padded_mask: one sequence per row, --micro_batch_size 2 per pass, in sample order, padding masked
          by a [R, W] attention mask (rl.py's loss pass before packing);
  padded: the same rows, padding continuing the row's sequence instead: no mask, one causal call
          (rl.py --packing False);
  packed: sequences bin-packed into rows, micro-batches of --micro_batch_tokens, attention
          "sdpa_packed" (sdpa once per sequence, common.py) (rl.py --share_prompts False);
  shared: packed, and each group's prompt laid out once per row, its completions attending to that
          copy (rl.py's default path);
  packed_mask: the same micro-batches with transformers' sdpa, which turns the restarting position
          ids into one block-diagonal [W, W] mask per row (what packing costs without sdpa_packed);
  sorted: one sequence per row, rows sorted by length, micro-batches of --micro_batch_tokens (less
          padding without packing).

"attn area": query-key pairs the attention computes (R x W^2 per pass with a mask, the masked pairs
included; sum of L^2 per sequence with sdpa_packed) over the causal pairs the step needs (sum of
L^2 / 2): a mask never lets the kernel skip work.

Padding fraction = padded slots / all slots the decoder runs; tokens/s = the step's sequence tokens
(prompt + completion of every sample, a shared prompt counted for each of its completions) / seconds
of forward + backward. The loss and every gradient of the packed and sorted paths
must equal the padded path's within --tol.
"""

import argparse
import math
import os
import random
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import rl  # noqa: E402


def make_samples(n, vocab, seed, max_completion, group_size=8):
    """n GRPO samples: groups share a prompt; completion lengths lognormal (R1-like long tail)."""
    rng = random.Random(seed)
    samples = []
    for g in range(n // group_size):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(50, 300))]
        for _ in range(group_size):
            c = min(max(int(rng.lognormvariate(math.log(900), 0.8)), 200), max_completion)
            samples.append({
                "prompt_ids": prompt, "completion_ids": [rng.randrange(3, vocab) for _ in range(c)],
                "loss_mask": [1] * c, "advantage": rng.gauss(0, 1), "vision": {}, "rope": None, "group": g,
                "sampler_logprobs": [0.0] * c, "ref_logprobs": [-rng.uniform(1, 3) for _ in range(c)]})
    return samples


def sorted_microbatches(samples, budget):
    """One sequence per row, longest first; rows fill a micro-batch up to `budget` padded tokens."""
    lengths = [len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples]
    mbs, widest = [], 0
    for i in sorted(range(len(samples)), key=lambda i: -lengths[i]):
        if mbs and (len(mbs[-1]) + 1) * widest <= budget:
            mbs[-1].append([i])
        else:
            mbs.append([[i]])
            widest = lengths[i]
    return mbs


def attention_area(samples, mbs, masked):
    """Query-key pairs the attention computes / the causal pairs the step needs (sum of L^2 / 2).
    masked (a [R, W] padding mask, or transformers' sdpa on packed rows): R x W^2 per pass, the mask
    skips nothing. Otherwise a pass whose rows each hold one sequence is one causal call, R x W^2 / 2
    (padding included), and sdpa_packed costs L^2 / 2 per sequence (a row's padding joins its last)."""
    length = lambda i: len(samples[i]["prompt_ids"]) + len(samples[i]["completion_ids"])  # noqa: E731
    done = 0
    for rows in mbs:
        widths = [sum(length(i) for i in row) for row in rows]
        W, multi = max(widths), any(len(row) > 1 for row in rows)
        if masked and (multi or min(widths) < W):
            done += len(rows) * W ** 2
        elif not multi:
            done += len(rows) * W ** 2 / 2
        else:
            done += sum(sum(length(i) ** 2 for i in row[:-1]) + (W - sum(length(i) for i in row[:-1])) ** 2
                        for row in rows) / 2
    return done / sum(length(i) ** 2 / 2 for i in range(len(samples)))


def loss_pass(model, samples, mbs, step_tokens, beta, padding_mask=False, share=False):
    """Forward + backward of the whole step, as rl.py's loop does it -> (loss, seconds, slots, padding).
    padding_mask: a [R, W] attention mask over the padding instead of position ids (the padded path
    before packing: transformers then builds a [R, 1, W, W] mask, and sdpa computes every pair)."""
    model.zero_grad(set_to_none=True)
    total, slots, laid, t0 = 0.0, 0, 0, time.perf_counter()
    for rows in mbs:
        batch = rl.collate(samples, rows, 0, torch.device("cpu"), share_prompts=share)
        slots += batch["input_ids"].numel()
        laid += sum(rl._row_width(samples, row, share) for row in rows)
        if padding_mask:
            real = [sum(len(samples[i]["prompt_ids"]) + len(samples[i]["completion_ids"]) for i in row) for row in rows]
            mask = (torch.arange(batch["input_ids"].shape[1])[None] < torch.tensor(real)[:, None]).long()
            logp, _ = model(targets=batch["targets"], temperature=1.0, input_ids=batch["input_ids"],
                            attention_mask=mask)
        else:
            logp, _ = rl.completion_logprobs(model, batch, 1.0)
        loss, _ = rl.policy_loss(logp, logp.detach(), batch["advantages"], batch["mask"], step_tokens,
                                 ref_logprobs=batch["ref_logprobs"], beta=beta)
        loss.backward()
        total += loss.item()
    return total, time.perf_counter() - t0, slots, 1 - laid / slots


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_sequences", type=int, default=64, help="sequences in the step (groups of 8)")
    p.add_argument("--max_completion", type=int, default=4096, help="completion length cap")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--vocab_size", type=int, default=4096,
                   help="small, so the LM head (the same work on every path) does not hide the decoder")
    p.add_argument("--micro_batch_size", type=int, default=2, help="padded path: sequences per pass")
    p.add_argument("--micro_batch_tokens", type=int, default=None,
                   help="packed / sorted paths: tokens per pass (default: micro_batch_size x (max_completion + 300),"
                        " what a padded micro-batch can hold)")
    p.add_argument("--paths", default="padded,padded_mask,packed,shared,packed_mask,sorted",
                   help="comma-separated, from padded, padded_mask, packed, shared, packed_mask, sorted; "
                        "speed-ups are against the first")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions of each path (alternating)")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    budget = args.micro_batch_tokens or args.micro_batch_size * (args.max_completion + 300)

    from transformers import Qwen2Config, Qwen2ForCausalLM
    common.register_packed_sdpa()
    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                         intermediate_size=4 * args.hidden_size, num_attention_heads=args.hidden_size // 64,
                         num_key_value_heads=max(args.hidden_size // 128, 1), max_position_embeddings=8192,
                         tie_word_embeddings=False, attn_implementation=common.PACKED_SDPA)
    model = common.LogProbModel(Qwen2ForCausalLM(config).float(), chunk_size=512)
    samples = make_samples(args.num_sequences, args.vocab_size, args.seed, args.max_completion)
    lengths = sorted(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples)
    real = sum(lengths)
    step_tokens = sum(sum(s["loss_mask"]) for s in samples)
    print(f"{len(samples)} sequences, {real} tokens (length min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
          f"max {lengths[-1]}); Qwen2 hidden {args.hidden_size} x {args.num_layers} layers, vocab {args.vocab_size} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), float32 on CPU, "
          f"{torch.get_num_threads()} thread(s); packed / sorted budget {budget} tokens per pass")

    mbs = {"padded": rl.microbatches(samples, SimpleNamespace(packing=False, micro_batch_size=args.micro_batch_size)),
           "packed": rl.microbatches(samples, SimpleNamespace(packing=True, micro_batch_tokens=budget,
                                                              share_prompts=False)),
           "shared": rl.microbatches(samples, SimpleNamespace(packing=True, micro_batch_tokens=budget,
                                                              share_prompts=True, attn_implementation=common.PACKED_SDPA)),
           "sorted": sorted_microbatches(samples, budget)}
    paths = args.paths.split(",")
    mbs["packed_mask"], mbs["padded_mask"] = mbs["packed"], mbs["padded"]
    times, results = {k: [] for k in paths}, {}
    for rep in range(args.reps):
        for name in paths if rep % 2 == 0 else paths[::-1]:  # alternate, so drift in load hits both
            model.model.set_attn_implementation("sdpa" if name == "packed_mask" else common.PACKED_SDPA)
            loss, sec, slots, padding = loss_pass(model, samples, mbs[name], step_tokens, args.beta,
                                                  name == "padded_mask", name == "shared")
            times[name].append(sec)
            results[name] = (loss, slots, padding, {n: q.grad.clone() for n, q in model.named_parameters()})
            print(f"  rep {rep + 1} {name}: {sec:.1f} s")

    base = paths[0]
    print(f"\n{'path':11} {'passes':>6} {'slots':>8} {'padding':>8} {'attn area':>9} {'best s':>7} {'tok/s':>7} "
          f"{'speed-up':>8}  "
          f"loss / max grad diff vs {base}")
    for name in paths:
        loss, slots, padding, grads = results[name]
        best = min(times[name])
        diff = max((grads[n] - results[base][3][n]).abs().max().item() for n in grads)
        ok = abs(loss - results[base][0]) <= args.tol and diff <= args.tol
        area = "-" if name == "shared" else f"{attention_area(samples, mbs[name], masked=name.endswith('_mask')):.2f}"
        print(f"{name:11} {len(mbs[name]):6d} {slots:8d} {padding:8.1%} {area:>9} {best:7.1f} {real / best:7.0f} "
              f"{min(times[base]) / best:7.2f}x  {loss - results[base][0]:+.1e} / {diff:.1e} {'ok' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
