"""Will it fit? Peak memory per GPU of sft.py / rl.py, per component, before you rent the GPUs.

    python scripts/memory_plan.py --stage sft --num_gpus 32 --gpu_memory_gib 40    # the paper's SFT
    python scripts/memory_plan.py --stage rl --num_gpus 8 --gpu_memory_gib 80 --vllm_gpu_memory_utilization 0.7
    python scripts/memory_plan.py --model path/to/checkpoint --stage rl --num_gpus 8 --json

The model is built on the meta device from its config.json (`--model` a folder), or from the real published
config of Qwen2.5-VL-7B-Instruct / -3B-Instruct (`--model qwen2.5-vl-7b`, `qwen2.5-vl-3b`; nothing is
downloaded), and its parameters are counted per part. The rest is arithmetic on what the scripts hold:

  FSDP2 over all GPUs (fully_shard on every decoder layer, then on the root: embeddings, LM head, the whole
  vision tower, the final norm). Sharded (/N): fp32 master weights, fp32 gradients of the trained part,
  AdamW's two fp32 moments, and the reference model (bf16, only when beta > 0). Gathered in bf16: the root
  unit, kept through forward and backward, and two decoder layers (the one running + the one prefetched).
  Gradients come out of backward unsharded in bf16 and are reduce-scattered in fp32, one unit at a time.
  Activations per token (with or without gradient checkpointing), and the log-probs / cross-entropy head in
  chunks of 512 tokens (a flat peak whatever the length): both measured, see the constants below.
  rl.py with vLLM colocated on every GPU: asleep while training; for the weight push only its weights are
  awake; for generation its whole share (--vllm_gpu_memory_utilization x the GPU) is, holding the bf16
  weights (/ tensor-parallel size), its activations and the KV cache.

Prints, per GPU, each component in each phase (training, generation, weight push), whether each phase fits
in the GPU less a margin (CUDA context, NCCL buffers, allocator fragmentation: --margin_gib), and which flag to
change when it does not. `--json` prints the same as one JSON object. Flag names are the scripts' own, so a
plan's command line can be pasted onto sft.py / rl.py (a few planner-only what-ifs are marked as such).
"""

import argparse
import functools
import json
import math
import os
import sys

GiB = 2 ** 30
MB = 1e6

# ----------------------------------------------------------------------------------------------------
# Measured constants. Measured on the CPU by scripts/bench_memory.py at Qwen2.5-VL-7B's real widths (hidden
# 3584, intermediate 18944, 28 / 4 heads, vocabulary 152064), random weights, bf16 as the GPU runs under FSDP2,
# resident-memory slope over two lengths in fresh processes (torch 2.14, transformers 5.24, sdpa causal).
# Other widths are scaled from these (see `activation_bytes`).

ACT_LAYER_SAVED_MB = 0.234  # per token per decoder layer: what its forward keeps for backward, no checkpointing
#                             (0.226 counted exactly with saved-tensor hooks; 0.423 in fp32)
ACT_CKPT_SAVED_MB = 0.0094  # per token per decoder layer with checkpointing: its input (0.0072 exact), M-RoPE
ACT_LAYER_PEAK_MB = 0.280  # per token: one layer's forward + backward (the layer recomputed under checkpointing)
LOGITS_CHUNK_FP32_ROWS = 4.13  # one chunk's peak of [chunk, vocab] tensors in common.token_logprobs, counted in
#                               fp32 rows (1285 MB for 512 tokens), on top of the head's bf16 gradient and one
#                               more [V, H] gradient being added into it; flat from 640 to 1088 tokens (+3 MB).
#                               The old unchunked way (rl.py before): 2.13 MB per token.
CHUNK_SIZE = 512  # common.token_logprobs' default
# Estimates, not measured (no GPU here); read the real ones off the first run's logs and change them here.
VLLM_OVERHEAD_GIB = 2.5  # vLLM's activation peak while profiling, CUDA graphs, non-torch memory (7B, bf16)
VLLM_ASLEEP_GIB = 0.5  # what a sleeping vLLM engine keeps (level 2: weights and KV cache released)
NON_LAYER_BYTES_PER_HIDDEN = 12  # per token: the head's input rows and their gradient (bf16), final norm (fp32)

# Memory torch reports on a card (torch.cuda.get_device_properties(0).total_memory), by its advertised size.
CARD_GIB = {40: 39.4, 80: 79.1, 94: 93.1, 141: 139.7}

# The real config.json of Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct (same vision tower).
QWEN25_VL_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}
QWEN25_VL_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
PRESETS = {
    "qwen2.5-vl-7b": {**QWEN25_VL_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
                      "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
                      "tie_word_embeddings": False, "vocab_size": 152064,
                      "vision_config": {**QWEN25_VL_VISION, "out_hidden_size": 3584}},
    "qwen2.5-vl-3b": {**QWEN25_VL_COMMON, "hidden_size": 2048, "intermediate_size": 11008, "max_window_layers": 70,
                      "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
                      "tie_word_embeddings": True, "vocab_size": 151936,
                      "vision_config": {**QWEN25_VL_VISION, "out_hidden_size": 2048}},
}


# ----------------------------------------------------------------------------------------------------
# The model: parameter counts per part, from a meta-device build


def load_config(model: str):
    from transformers import AutoConfig

    if model in PRESETS:
        from transformers import Qwen2_5_VLConfig
        return Qwen2_5_VLConfig.from_dict(PRESETS[model])
    if os.path.isfile(os.path.join(model, "config.json")):
        return AutoConfig.from_pretrained(model)
    raise SystemExit(f"--model {model!r}: not a folder with config.json, nor a preset ({', '.join(PRESETS)})")


def count_parameters(config, freeze_vision: bool = True, freeze_projector: bool = False) -> dict:
    """Parameters per part of the model that `config` describes (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from common import vision_part  # the scripts' own rule for what the vision tower is

    is_vlm = getattr(config, "vision_config", None) is not None
    with torch.device("meta"):
        model = (AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM).from_config(config)
    parts = dict.fromkeys(["vision_tower", "projector", "embeddings", "lm_head", "decoder_layers", "other"], 0)
    layers, largest = {}, 0
    for name, p in model.named_parameters():  # tied weights are listed once
        n, largest = p.numel(), max(largest, p.numel())
        part = vision_part(name)
        if part == "tower":
            parts["vision_tower"] += n
        elif part == "projector":
            parts["projector"] += n
        elif "embed_tokens" in name:
            parts["embeddings"] += n
        elif name.startswith("lm_head"):
            parts["lm_head"] += n
        elif ".layers." in name:
            parts["decoder_layers"] += n
            idx = int(name.split(".layers.")[1].split(".")[0])
            layers[idx] = layers.get(idx, 0) + n
        else:
            parts["other"] += n
    text = getattr(config, "text_config", config)
    tied = parts["lm_head"] == 0
    total = sum(parts.values())
    trainable = total - parts["vision_tower"] * freeze_vision - parts["projector"] * freeze_projector
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "parts": parts, "total": total, "trainable": trainable, "tied_embeddings": tied,
        "num_layers": len(layers), "layer": max(layers.values()) if layers else 0, "largest_parameter": largest,
        # the root unit: everything outside the decoder layers (FSDP2 keeps it gathered through fwd + bwd)
        "root": total - parts["decoder_layers"],
        "root_trainable": (parts["embeddings"] + parts["lm_head"] + parts["other"]
                           + parts["projector"] * (not freeze_projector) + parts["vision_tower"] * (not freeze_vision)),
        "lm_head": parts["embeddings"] if tied else parts["lm_head"],  # the [V, H] matrix the head multiplies by
        "hidden": text.hidden_size, "intermediate": text.intermediate_size, "vocab": text.vocab_size,
        "heads": heads, "kv_heads": kv, "head_dim": head_dim,
        "vision_heads": getattr(getattr(config, "vision_config", None), "num_heads", None),
        "kv_bytes_per_token": 2 * len(layers) * kv * head_dim * 2,  # K and V, every layer, bf16
    }


@functools.lru_cache(maxsize=None)
def model_counts(model: str, freeze_vision: bool = True, freeze_projector: bool = False) -> dict:
    """count_parameters for a preset or folder, once per process (the planner re-plans to find advice)."""
    return count_parameters(load_config(model), freeze_vision, freeze_projector)


def allowed_tensor_parallel(m: dict, num_gpus: int) -> list[int]:
    """vLLM splits attention heads (and KV heads, or replicates them) and the vision tower's heads over the
    tensor-parallel group; the group must also tile the GPUs."""
    ok = []
    for tp in range(1, num_gpus + 1):
        if (num_gpus % tp == 0 and m["heads"] % tp == 0 and (m["kv_heads"] % tp == 0 or tp % m["kv_heads"] == 0)
                and (m["vision_heads"] is None or m["vision_heads"] % tp == 0)):
            ok.append(tp)
    return ok


# ----------------------------------------------------------------------------------------------------
# The arithmetic


def activation_bytes(m: dict, tokens: int, checkpointing: bool) -> dict:
    """Activations of one micro-batch of `tokens` tokens, scaled from the 7B's measurements: a layer keeps
    4 intermediate-wide bf16 tensors per token (gate, up, silu(gate), their product: 8 x 18944 bytes of the
    measured 0.234 MB) and the rest grows with the hidden size."""
    i_bytes = 8 * m["intermediate"]
    h_per = (ACT_LAYER_SAVED_MB * MB - 8 * 18944) / 3584
    saved_layer = h_per * m["hidden"] + i_bytes  # bytes per token per layer
    scale = saved_layer / (ACT_LAYER_SAVED_MB * MB)
    ckpt_layer = ACT_CKPT_SAVED_MB * MB * m["hidden"] / 3584
    peak_layer = ACT_LAYER_PEAK_MB * MB * scale
    L = m["num_layers"]
    saved = L * (ckpt_layer if checkpointing else saved_layer) * tokens
    # the layer in backward: recomputed whole under checkpointing, else only its backward's extra
    working = (peak_layer if checkpointing else peak_layer - saved_layer) * tokens
    return {"saved": saved + NON_LAYER_BYTES_PER_HIDDEN * m["hidden"] * tokens, "layer_backward": working}


def plan(a) -> dict:
    """Every phase's components (bytes per GPU) for the flags `a`."""
    m = model_counts(a.model, a.freeze_vision_tower, a.freeze_projector)
    N, rl = a.num_gpus, a.stage == "rl"
    fsdp = a.fsdp == "on" or (a.fsdp == "auto" and N > 1)
    total_gib = CARD_GIB.get(a.gpu_memory_gib, a.gpu_memory_gib)
    limit = (total_gib - a.margin_gib) * GiB
    P, T = m["total"], m["trainable"]
    head = m["lm_head"]
    shard = N if fsdp else 1

    # --- what each GPU holds the whole run ---
    master = P * 4 / shard
    grads = T * 4 / shard
    adam = T * 8 / shard
    ref = P * 2 / shard if rl and a.beta > 0 and not a.ref_offload else 0.0

    # --- one micro-batch ---
    if rl and a.packing:  # sequences packed into micro-batches of a token budget
        tokens = head_tokens = a.micro_batch_tokens
    elif rl:
        tokens = a.micro_batch_size * (a.max_prompt_length + a.max_response_length)  # padded to the longest
        head_tokens = a.micro_batch_size * a.max_response_length
    else:
        tokens = a.per_device_batch_size * a.max_length  # packed rows never exceed this
        head_tokens = tokens
    act = activation_bytes(m, tokens, a.gradient_checkpointing)
    chunk = min(a.logprob_chunk_size, head_tokens)
    logits = LOGITS_CHUNK_FP32_ROWS * chunk * m["vocab"] * 4
    if fsdp:
        gathered = m["root"] * 2 + (1 + a.fsdp_prefetch) * m["layer"] * 2
        gathered_name = "bf16 weights: gathered / autocast copies"  # root unit + 1 + prefetch layers
        head_held = head * 2  # the head's unsharded bf16 gradient, until the root's reduce-scatter at the end
        head_extra = head * 2  # from the 2nd chunk on: the chunk's [V, H] gradient being added into it
        layer_grad = m["layer"] * (2 + 4)  # one layer's unsharded bf16 gradient + its fp32 reduce-scatter input
        root_reduce = m["root_trainable"] * (2 + 4)  # end of backward: the root's gradients, same way
    else:  # one process, no FSDP: fp32 weights, bf16 autocast copies (all cached until forward ends)
        gathered = (P - m["parts"]["vision_tower"] - m["parts"]["projector"]) * 2
        gathered_name = "bf16 weights: gathered / autocast copies"
        head_held, head_extra = 0.0, 0.0
        # in backward: the head's and one layer's copies; a bf16 gradient cast to fp32 before it is added
        layer_grad = max(head, m["layer"]) * (2 + 4)
        root_reduce = 0.0
    asleep = ((VLLM_ASLEEP_GIB if a.vllm_sleep else a.vllm_gpu_memory_utilization * total_gib) * GiB
              if rl and a.backend == "vllm" else 0.0)

    per = f" (/{shard})" if fsdp else ""
    base = {"fp32 master weights" + per: master, "fp32 gradients, trained part" + per: grads,
            "AdamW states, 2 x fp32" + per: adam}
    if rl and a.beta > 0:
        base["reference model, bf16" + per + (", on CPU" if a.ref_offload else "")] = ref
    # three moments of a training step; the step's peak is the largest. log-probs: the head's chunks and the
    # start of backward; layers: backward through the last decoder layer; reduce: the root unit's
    # gradients reduce-scattered at the end of backward (activations and gathered weights already freed)
    moments = {
        "train:head": {gathered_name: gathered, "activations": act["saved"],
                       "unsharded gradients": head_held + head_extra, f"log-prob head, {chunk}-token chunk": logits},
        "train:layers": {gathered_name: gathered if fsdp else (head + m["layer"]) * 2,
                         "activations": act["saved"] + act["layer_backward"],
                         "unsharded gradients": head_held + layer_grad},
        "train:reduce": {"unsharded gradients": root_reduce},
    }
    when, extra = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    vllm = rl and a.backend == "vllm"
    engine = {}
    if vllm:
        engine["vLLM asleep (rest)" if a.vllm_sleep else "vLLM awake (--vllm_sleep false)"] = asleep
    phases = {"training": {**base, **extra, **engine}}
    moment_totals = {k: sum({**base, **v, **engine}.values()) / GiB for k, v in moments.items()}
    notes = [f"training peaks at '{when}'"]

    # --- rl: generation and the weight push ---
    if rl:
        seqs = a.prompts_per_step * a.num_generations // N  # this rank's completions per step
        seq_len = a.max_prompt_length + a.max_response_length
        # between steps the gradients are gone (zero_grad(set_to_none=True)); weights, AdamW, reference stay
        trainer_idle = {k: v for k, v in base.items() if "gradients" not in k}
        if a.offload_during_generation:
            trainer_idle = {k + " -> CPU": 0.0 for k in trainer_idle}
        if vllm:
            tp = a.vllm_tensor_parallel_size
            share = a.vllm_gpu_memory_utilization * total_gib * GiB
            weights = (P - (m["parts"]["vision_tower"] + m["parts"]["projector"]) * a.vllm_text_only) * 2 / tp
            kv = share - weights - VLLM_OVERHEAD_GIB * GiB
            kv_token = m["kv_bytes_per_token"] / tp
            engine_seqs = seqs * tp  # an engine serves its tensor-parallel group's ranks
            held = max(kv, 0) / (kv_token * seq_len)  # full-length sequences the engine's KV cache holds at once
            phases["generate"] = {**trainer_idle, f"vLLM weights, bf16 (/{tp} TP)": weights,
                                  "vLLM activations etc. (estimate)": VLLM_OVERHEAD_GIB * GiB,
                                  "vLLM KV cache": max(kv, 0)}
            push = m["largest_parameter"] * (4 + 2) if a.weight_push == "per_param" else m["root"] * 2
            phases["push"] = {**trainer_idle, f"vLLM weights, bf16 (/{tp} TP)": weights,
                              "vLLM asleep (rest)": VLLM_ASLEEP_GIB * GiB,
                              ("push buffer: largest tensor, fp32+bf16" if a.weight_push == "per_param"
                               else "push buffer: root unit, bf16"): push}
            extra_info = {"kv_cache_gib": kv / GiB, "kv_sequences_at_once": held, "sequences_per_engine": engine_seqs,
                          "kv_bytes_per_token_per_gpu": kv_token,
                          "share_gib": share / GiB, "min_utilization": (weights + VLLM_OVERHEAD_GIB * GiB
                                                                        + kv_token * seq_len) / (total_gib * GiB)}
            if kv < kv_token * seq_len:
                notes.append(f"vLLM cannot start: {a.vllm_gpu_memory_utilization:g} x {total_gib:g} GiB = "
                             f"{share / GiB:.1f} GiB does not hold {weights / GiB:.1f} GiB of weights + "
                             f"{VLLM_OVERHEAD_GIB} GiB + one {seq_len}-token sequence's KV cache")
            else:
                notes.append(f"vLLM's KV cache ({kv / GiB:.1f} GiB) holds {held:.0f} full-length sequences at once of "
                             f"the {engine_seqs} its engine generates per step")
        else:  # transformers' generate on gathered bf16 weights, the policy's own
            batch = min(a.generation_batch_size, seqs)
            phases["generate"] = {**trainer_idle, ("full bf16 weights, gathered" if fsdp else gathered_name):
                                    P * 2 if fsdp else gathered,
                                    f"KV cache ({batch} sequences x {seq_len} tokens)": batch * seq_len * m["kv_bytes_per_token"],
                                    "logits of one step": batch * m["vocab"] * 4 * 2}
            extra_info = {}
    else:
        extra_info = {}

    out = {"model": a.model, "stage": a.stage, "num_gpus": N, "gpu_memory_gib": total_gib, "margin_gib": a.margin_gib,
           "limit_gib": limit / GiB, "fsdp": fsdp, "tokens_per_micro_batch": tokens,
           "parameters": {k: v for k, v in m.items() if k not in ("parts",)} | {"parts": m["parts"]},
           "phases": {}, "fits": True, "notes": notes, "training_moments": {
               k: {"components_gib": {c: x / GiB for c, x in {**base, **v, **engine}.items()},
                   "total_gib": moment_totals[k]} for k, v in moments.items()}, **extra_info}
    for name, comps in phases.items():
        tot = sum(comps.values())
        no_kv = name == "generate" and vllm and extra_info["kv_sequences_at_once"] < 1  # vLLM refuses to start
        ok = tot <= limit and not no_kv
        out["phases"][name] = {"components_gib": {k: v / GiB for k, v in comps.items()}, "total_gib": tot / GiB, "fits": ok}
        out["fits"] &= ok
    return out


def advice(a, result: dict) -> list[str]:
    """Flags that make a failing phase fit (or a slow one faster), found by re-planning."""
    tips = []

    def fits(**changes):
        b = argparse.Namespace(**{**vars(a), **changes})
        return plan(b)

    ph = result["phases"]
    if not ph["training"]["fits"]:
        if not a.gradient_checkpointing and fits(gradient_checkpointing=True)["phases"]["training"]["fits"]:
            tips.append("--gradient_checkpointing true")
        if a.stage == "rl" and a.packing:
            for t in range(a.micro_batch_tokens - 1024, 1023, -1024):
                if fits(micro_batch_tokens=t)["phases"]["training"]["fits"]:
                    tips.append(f"--micro_batch_tokens {t} (memory only: the step's math is unchanged)")
                    break
        else:
            key = "micro_batch_size" if a.stage == "rl" else "per_device_batch_size"
            for b in range(getattr(a, key) - 1, 0, -1):
                if fits(**{key: b})["phases"]["training"]["fits"]:
                    tips.append(f"--{key} {b}" + (" (and --gradient_accumulation_steps up to keep the global batch)"
                                                   if a.stage == "sft" else " (memory only: the step's math is unchanged)"))
                    break
        if a.stage == "rl" and a.beta > 0 and not a.ref_offload and fits(ref_offload=True)["phases"]["training"]["fits"]:
            tips.append("offload the reference model to the CPU (planner what-if: --ref_offload) or --beta 0")
        for n in (a.num_gpus * 2 ** k for k in range(1, 7)):
            if fits(num_gpus=n)["phases"]["training"]["fits"]:
                tips.append(f"{n} GPUs instead of {a.num_gpus}")
                break
    if a.stage == "rl" and a.backend == "vllm":
        total = result["gpu_memory_gib"]
        idle = sum(v for k, v in ph["generate"]["components_gib"].items() if not k.startswith("vLLM"))
        best = math.floor((result["limit_gib"] - idle) / total * 20) / 20  # the largest share that still fits
        need = result["min_utilization"]
        full = (result["sequences_per_engine"] * (a.max_prompt_length + a.max_response_length)
                * result["kv_bytes_per_token_per_gpu"] / GiB + (result["share_gib"] - result["kv_cache_gib"])
                ) / total  # a share whose KV cache holds the engine's whole step at once
        if not ph["generate"]["fits"] or result["kv_sequences_at_once"] < result["sequences_per_engine"]:
            if need <= best:
                pick = min(best, max(math.ceil(full * 20) / 20, math.ceil(need * 20) / 20))
                if abs(pick - a.vllm_gpu_memory_utilization) > 1e-9:
                    r = fits(vllm_gpu_memory_utilization=pick)
                    tips.append(f"--vllm_gpu_memory_utilization {pick:g} (KV cache {r['kv_cache_gib']:.1f} GiB: "
                                f"{r['kv_sequences_at_once']:.0f} of {r['sequences_per_engine']} sequences at once; "
                                f"at most {best:g} fits next to the trainer's {idle:.1f} GiB)")
            else:
                for tp in allowed_tensor_parallel(result["parameters"], a.num_gpus):
                    if tp > a.vllm_tensor_parallel_size:
                        tips.append(f"--vllm_tensor_parallel_size {tp} (the weights split over {tp} GPUs), then re-plan")
                        break
                if not a.offload_during_generation:
                    tips.append("offload the trainer's weights and optimizer state to the CPU while vLLM generates "
                                "(planner what-if: --offload_during_generation)")
    if "push" in ph and not ph["push"]["fits"] and a.weight_push != "per_param":
        tips.append("push the weights one parameter at a time (--weight_push per_param)")
    return tips


# ----------------------------------------------------------------------------------------------------
# Command line and the table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and machine")
    g.add_argument("--model", default="qwen2.5-vl-7b", help=f"a folder with config.json, or a preset: {', '.join(PRESETS)}")
    g.add_argument("--stage", choices=["sft", "rl"], default="sft")
    g.add_argument("--num_gpus", type=int, default=8, help="GPUs in the run, all nodes together (FSDP shards over all)")
    g.add_argument("--gpu_memory_gib", type=float, default=80,
                   help=f"memory of one GPU; an advertised size is read as what torch sees: {CARD_GIB}")
    g.add_argument("--margin_gib", type=float, default=2.0,
                   help="kept free: CUDA context, NCCL buffers, allocator fragmentation (estimate)")
    g.add_argument("--fsdp", choices=["auto", "on", "off"], default="auto",
                   help="auto: FSDP2 with more than one GPU; off: one process, fp32 weights + bf16 autocast")
    g.add_argument("--fsdp_prefetch", type=int, default=1, help="decoder layers FSDP2 gathers ahead of the running one")
    g = p.add_argument_group("both stages")
    _flag(g, "--gradient_checkpointing", True, "recompute each layer in backward")
    _flag(g, "--freeze_vision_tower", True, "vision tower frozen (paper)")
    _flag(g, "--freeze_projector", False, "also freeze the vision-to-language projector (Qwen's merger)")
    g.add_argument("--logprob_chunk_size", type=int, default=CHUNK_SIZE, help="tokens per chunk of the log-prob head")
    g = p.add_argument_group("sft.py")
    g.add_argument("--per_device_batch_size", type=int, default=4, help="examples per micro-batch (paper: 4)")
    g.add_argument("--max_length", type=int, default=4096, help="tokens per example (paper: 4096)")
    g = p.add_argument_group("rl.py")
    g.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    g.add_argument("--prompts_per_step", type=int, default=128, help="(paper: 128)")
    g.add_argument("--num_generations", type=int, default=8, help="(paper: 8)")
    g.add_argument("--max_prompt_length", type=int, default=1024)
    g.add_argument("--max_response_length", type=int, default=4096, help="(paper: 4096)")
    _flag(g, "--packing", True, "sequences packed into micro-batches of --micro_batch_tokens")
    g.add_argument("--micro_batch_tokens", type=int, default=10240, help="packing: tokens per forward/backward")
    g.add_argument("--micro_batch_size", type=int, default=2, help="without packing: sequences per forward/backward")
    g.add_argument("--beta", type=float, default=1e-2, help="KL weight; 0 = no reference model (paper: 1e-2)")
    g.add_argument("--generation_batch_size", type=int, default=64, help="sequences per generate call (hf backend)")
    g.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.3, help="vLLM's share of each GPU")
    g.add_argument("--vllm_tensor_parallel_size", type=int, default=1, help="GPUs per vLLM engine")
    _flag(g, "--vllm_sleep", True, "vLLM releases its memory while the trainer trains")
    _flag(g, "--vllm_text_only", False, "planner what-if: the engine is built without the vision tower")
    g.add_argument("--weight_push", choices=["per_param", "per_unit"], default="per_param",
                   help="planner what-if: how the trainer's weights reach vLLM")
    _flag(g, "--ref_offload", False, "planner what-if: reference model on the CPU")
    _flag(g, "--offload_during_generation", False,
          "planner what-if: trainer weights and optimizer state on the CPU while vLLM generates")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def _flag(group, name: str, default: bool, help: str) -> None:
    """A boolean flag spelled as the scripts spell theirs: --name, --name true/false, --no_name."""
    dest = name[2:]
    group.add_argument(name, dest=dest, type=_bool, nargs="?", const=True, default=default,
                       help=f"{help} (default: {default})")
    group.add_argument("--no_" + dest, dest=dest, action="store_false", help=argparse.SUPPRESS)


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def check_tensor_parallel(a) -> str | None:
    if a.stage != "rl" or a.backend != "vllm":
        return None
    m = model_counts(a.model)
    ok = allowed_tensor_parallel(m, a.num_gpus)
    if a.vllm_tensor_parallel_size not in ok:
        return (f"--vllm_tensor_parallel_size {a.vllm_tensor_parallel_size} is refused: it must divide the "
                f"{m['heads']} attention heads (and fit the {m['kv_heads']} KV heads"
                + (f", the vision tower's {m['vision_heads']} heads" if m["vision_heads"] else "")
                + f") and the {a.num_gpus} GPUs; use one of {', '.join(map(str, ok))}")
    return None


def print_table(a, r: dict, tips: list[str]) -> None:
    pm = r["parameters"]
    parts = pm["parts"]
    print(f"{a.model}: {pm['total'] / 1e6:,.1f}M parameters, {pm['trainable'] / 1e6:,.1f}M trained | vision tower "
          f"{parts['vision_tower'] / 1e6:.2f}M, projector {parts['projector'] / 1e6:.2f}M, embeddings "
          f"{parts['embeddings'] / 1e6:.1f}M, LM head {parts['lm_head'] / 1e6:.1f}M"
          f"{' (tied)' if pm['tied_embeddings'] else ''}, {pm['num_layers']} decoder layers of {pm['layer'] / 1e6:.2f}M")
    if a.stage == "sft":
        what = (f"{a.per_device_batch_size} x {a.max_length} tokens per micro-batch")
    else:
        what = (f"{a.prompts_per_step} prompts x {a.num_generations}, prompt <= {a.max_prompt_length} + response <= "
                f"{a.max_response_length}, micro-batches of "
                + (f"{a.micro_batch_tokens} tokens" if a.packing else f"{a.micro_batch_size} sequences")
                + f", beta {a.beta:g}, backend {a.backend}"
                + (f", vLLM {a.vllm_gpu_memory_utilization:g} of the GPU, TP {a.vllm_tensor_parallel_size}"
                   if a.backend == "vllm" else ""))
    print(f"{a.stage} on {a.num_gpus} GPU(s) of {r['gpu_memory_gib']:g} GiB ({'FSDP2' if r['fsdp'] else 'no FSDP'}): "
          f"{what}; checkpointing {'on' if a.gradient_checkpointing else 'off'} ({r['tokens_per_micro_batch']} tokens)")
    cols = {**r["training_moments"], **{k: v for k, v in r["phases"].items() if k != "training"}}
    rows = []
    for c in cols.values():
        rows += [k for k in c["components_gib"] if k not in rows]
    w = max(len(k) for k in rows) + 2
    cw = max(len(n) for n in cols) + 1
    print("\n" + "per GPU, GiB".ljust(w) + "".join(n.rjust(cw) for n in cols))
    for k in rows:
        vals = [c["components_gib"].get(k) for c in cols.values()]
        print(k.ljust(w) + "".join((f"{v:{cw}.2f}" if v is not None else "-".rjust(cw)) for v in vals))
    print("total".ljust(w) + "".join(f"{c['total_gib']:{cw}.2f}" for c in cols.values()))
    fits = [c["total_gib"] <= r["limit_gib"] if n.startswith("train") else c["fits"] for n, c in cols.items()]
    print(f"fits in {r['limit_gib']:.1f} ({r['gpu_memory_gib']:g} - {r['margin_gib']:g} margin)".ljust(w)
          + "".join(("yes" if f else "NO").rjust(cw) for f in fits))
    print()
    for n in r["notes"]:
        print(f"- {n}")
    if r["fits"]:
        print("FITS" + ("; faster: " + "; ".join(tips) if tips else ""))
    else:
        print("DOES NOT FIT" + ("; any one of these makes it fit: " + "; ".join(tips) if tips else ""))


def main(argv=None) -> int:
    a = parse_args(argv)
    err = check_tensor_parallel(a)
    if err:
        print(json.dumps({"error": err}) if a.json else err)
        return 2
    r = plan(a)
    tips = advice(a, r)
    if a.json:
        print(json.dumps({**r, "advice": tips}, indent=1))
    else:
        print_table(a, r, tips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
