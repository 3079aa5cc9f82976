r"""Stage 2 of X-Reasoner: GRPO with verifiable rewards on text-only math (Orz-math-57k).

    # the paper's recipe on one node of 8 GPUs: FSDP2 trainer shards + a vLLM engine colocated per GPU
    accelerate launch --config_file configs/8gpu.yaml rl.py --model_name_or_path runs/sft \\
        --dataset orz_math_57k_collected.json --output_dir runs/rl
    # a laptop: transformers' generate instead of vLLM, a tiny random VLM and toy data (made by
    # python scripts/make_tiny_model.py --output_dir tiny-vl; python scripts/make_toy_data.py --output_dir toy)
    python rl.py --backend hf --model_name_or_path tiny-vl --dataset toy/rl/orz_math.json \\
        --output_dir /tmp/rl --max_steps 2 --prompts_per_step 4 --num_generations 4 \\
        --max_response_length 32

One step, as the numbered sections of the loop read:
  1. generate: take `prompts_per_step` prompts; each rank samples `num_generations` completions for
     its share (whole groups: a group never spans ranks, so advantages need no communication);
  2. rewards: `compute_rewards` scores each group: 1 if the extracted answer is equivalent to the gold
     answer, else 0 (the paper: no format reward; the optional components are flags);
  3. advantages: group-normalised (r - mean) / (std + 1e-4), per group;
  4. log-probs of the old policy (only with several updates per batch) and of the frozen reference
     (only when beta > 0);
  5. update: clipped policy gradient with clip-higher, one token-level mean over the whole step (DAPO);
  6. push the new weights into vLLM (the hf backend generates with the policy itself);
  7. log (log.jsonl, tqdm, wandb/tensorboard); 8. save an atomic checkpoint (`--resume` continues).

The passes over the step's samples (reference, old policy, loss) are padding-free: sequences packed
into rows and micro-batches of `micro_batch_tokens`, each group's prompt laid out once per row
(`share_prompts`), attention run per sequence (common.packed_sdpa); every rank runs as many passes.
What this leaves out of a full GRPO trainer: asynchronous generation, and a value model (GRPO has
none by design).

Several processes (torchrun or `accelerate launch`) shard the policy and the bf16 reference with
FSDP2; the log-probs never build [tokens, vocab] logits (common.token_logprobs, 512-token chunks).

Data: Orz-math-57k's JSON (a list of [{from: human, value}, {from: assistant, ground_truth: {value}}]
pairs), or rows with `question` and `answer` (optional `options`, list or letter->text dict, posed
with the multiple-choice prompt, e.g. MedQA for X-Reasoner-Med; optional `images`, paths relative to
the file).
"""

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm import tqdm

import common
import generation
import rewards


@dataclass
class Config:
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-7B-Instruct",
        metadata={"help": "policy to start from (paper: the SFT model of sft.py on Qwen2.5-VL-7B)"},
    )
    dataset: str = field(
        default="orz_math_57k_collected.json",
        metadata={"help": "JSON / JSONL / Parquet / CSV file, a save_to_disk folder or a hub id "
                          "(paper: Orz-math-57k)"},
    )
    dataset_config: str = field(
        default="",
        metadata={"help": "hub dataset config name, if any"},
    )
    dataset_split: str = field(
        default="train",
        metadata={"help": "split, for hub ids, save_to_disk folders and {split: rows} JSON"},
    )
    output_dir: str = field(
        default="runs/rl",
        metadata={"help": "checkpoints, log.jsonl, completions.jsonl and the final model"},
    )
    prompt_template: Literal["paper", "plain"] = field(
        default="paper",
        metadata={"help": "paper: the paper's training / MCQ prompt; plain: the question alone "
                          "(for tiny toy models, which cannot find a problem behind long "
                          "instructions)"},
    )
    max_prompt_length: int = field(
        default=1024,
        metadata={"help": "longer prompts are dropped (never truncated) and counted (paper: not "
                          "stated)"},
    )
    # generation
    backend: Literal["vllm", "hf"] = field(
        default="vllm",
        metadata={"help": "vllm: a colocated engine per GPU; hf: transformers generate (CPU, "
                          "tests)"},
    )
    num_generations: int = field(
        default=8,
        metadata={"help": "completions per prompt, the GRPO group (paper: 8)"},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "sampling temperature; the trainer's log-probs use it too (paper: 1.0)"},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "nucleus sampling (paper: 1.0)"},
    )
    max_response_length: int = field(
        default=4096,
        metadata={"help": "cap on completion tokens (paper: 4096)"},
    )
    think_budget: int | None = field(
        default=None,
        metadata={"help": "forced exit during RL: close </think> after this many tokens (paper: "
                          "off)"},
    )
    generation_batch_size: int = field(
        default=64,
        metadata={"help": "sequences per transformers `generate` call (hf backend only)"},
    )
    # rewards (the paper: accuracy only)
    lenient_extraction: bool = field(
        default=False,
        metadata={"help": "also reward answers only the lenient fallbacks find (the last number "
                          "of an unformatted response, a bare letter): evaluation reads them, but "
                          "RL would then reward answers without the taught <answer> format "
                          "(paper: off)"},
    )
    format_reward_weight: float = field(
        default=0.0,
        metadata={"help": "add this x rewards.format_reward (strict "
                          "<think>..</think><answer>..</answer>) (paper: 0, no format reward)"},
    )
    overlong_penalty: bool = field(
        default=False,
        metadata={"help": "add DAPO's soft overlong penalty over the last overlong_buffer tokens "
                          "(paper: off)"},
    )
    overlong_buffer: int = field(
        default=512,
        metadata={"help": "tokens before max_response_length where the overlong penalty ramps to "
                          "-1"},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "DAPO overlong filtering: truncated completions get no loss. Off "
                          "(paper): RL cut truncated responses, which needs them scored 0 and "
                          "trained on"},
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO: replace groups whose rewards are all equal by fresh ones (paper: "
                          "off)"},
    )
    dynamic_sampling_max_rounds: int = field(
        default=3,
        metadata={"help": "refill rounds per step; groups still missing keep zero advantage"},
    )
    # optimisation
    prompts_per_step: int = field(
        default=128,
        metadata={"help": "prompts per optimizer step, all ranks together (paper: 128)"},
    )
    packing: bool = field(
        default=True,
        metadata={"help": "pack the step's sequences into rows (position ids restart per "
                          "sequence) and micro-batches of micro_batch_tokens: no padding; off = "
                          "micro_batch_size padded sequences per pass. Memory and speed only, the "
                          "math is the same"},
    )
    micro_batch_tokens: int = field(
        default=10240,
        metadata={"help": "packing: tokens (padding included) per forward/backward on a rank"},
    )
    share_prompts: bool = field(
        default=True,
        metadata={"help": "packing with sdpa_packed: a group's prompt laid out once per row, its "
                          "completions attending to that copy. Speed only, the math is the same"},
    )
    micro_batch_size: int = field(
        default=2,
        metadata={"help": "without packing: sequences per forward/backward on a rank"},
    )
    num_epochs: int = field(
        default=3,
        metadata={"help": "passes over the prompts (paper: 3, stopped once the reward converges)"},
    )
    max_steps: int = field(
        default=-1,
        metadata={"help": "stop after this many steps (-1: num_epochs passes)"},
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "optimizer updates per generated batch; 1 = on-policy, as the paper"},
    )
    learning_rate: float = field(
        default=3e-6,
        metadata={"help": "AdamW peak learning rate (paper: 3e-6)"},
    )
    weight_decay: float = field(
        default=1e-2,
        metadata={"help": "AdamW weight decay (paper: 1e-2)"},
    )
    adam_beta1: float = field(
        default=0.9,
        metadata={"help": "AdamW beta1 (paper: not stated; AdamW's default)"},
    )
    adam_beta2: float = field(
        default=0.999,
        metadata={"help": "AdamW beta2 (paper: not stated; AdamW's default)"},
    )
    warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "linear warm-up over this fraction of the updates (paper: 10%%)"},
    )
    lr_scheduler: Literal["constant", "cosine"] = field(
        default="constant",
        metadata={"help": "after warm-up: constant (verl's default; paper: not stated) or cosine "
                          "to 0"},
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "gradient-norm clip (paper: 1.0; 0 = off)"},
    )
    beta: float = field(
        default=1e-2,
        metadata={"help": "k3 KL penalty to the frozen starting model (paper: 1e-2); 0 = no "
                          "reference"},
    )
    eps_low: float = field(
        default=0.2,
        metadata={"help": "ratio clip below 1 (paper: 0.2)"},
    )
    eps_high: float = field(
        default=0.28,
        metadata={"help": "clip-higher above 1 (paper: 'clip-higher', value not given; DAPO's "
                          "0.28)"},
    )
    scale_rewards: bool = field(
        default=True,
        metadata={"help": "divide advantages by the group std (GRPO, paper); False = Dr. GRPO"},
    )
    tis_cap: float = field(
        default=2.0,
        metadata={"help": "truncated importance sampling: weight each token by min(pi_train / "
                          "pi_sampler, cap), for the gap between vLLM's and the trainer's "
                          "log-probs (after the paper; 0 = off)"},
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "freeze the vision tower (paper: frozen vision encoder)"},
    )
    freeze_projector: bool = field(
        default=False,
        metadata={"help": "also freeze the vision-to-language projector (paper: not stated)"},
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "recompute activations in backward (the 7B at 4096 tokens needs it)"},
    )
    bf16: bool = field(
        default=True,
        metadata={"help": "GPUs: compute in bf16 with fp32 master weights and gradient reduction, "
                          "and a bf16 reference model; the CPU always runs fp32"},
    )
    logprob_chunk_size: int = field(
        default=512,
        metadata={"help": "tokens per LM-head chunk in the log-probs: memory only, the math is "
                          "the same"},
    )
    attn_implementation: Literal["sdpa_packed", "sdpa", "eager", "flash_attention_2"] = field(
        default="sdpa_packed",
        metadata={"help": "attention kernel. sdpa_packed: sdpa once per packed sequence (no [W, W] "
                          "mask); flash_attention_2: GPUs with flash-attn installed"},
    )
    # vLLM
    vllm_gpu_memory_utilization: float = field(
        default=0.7,
        metadata={"help": "GPU memory fraction vLLM takes while it generates (weights + KV "
                          "cache); the trainer keeps only its fp32 shards then "
                          "(scripts/memory_plan.py: 0.7 fits the 7B on 8 x 80 GB and on 32 x 40 "
                          "GB)"},
    )
    vllm_tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "GPUs per engine (must divide the model's attention heads: 28 for the "
                          "7B)"},
    )
    vllm_sleep: bool = field(
        default=True,
        metadata={"help": "free vLLM's GPU memory while training (sleep level 2; GPUs only)"},
    )
    vllm_dtype: str = field(
        default="auto",
        metadata={"help": "vLLM's weight dtype (auto: the checkpoint's, bf16 for the paper's "
                          "model)"},
    )
    vllm_kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={"help": "a fixed KV cache size instead of the memory fraction (CPU tests)"},
    )
    # bookkeeping
    save_steps: int = field(
        default=50,
        metadata={"help": "checkpoint (resumable state) every N steps and at the end (0 = none: "
                          "only the final model)"},
    )
    save_total_limit: int = field(
        default=2,
        metadata={"help": "keep this many checkpoints (0 = all)"},
    )
    save_dtype: Literal["bfloat16", "float32"] = field(
        default="bfloat16",
        metadata={"help": "dtype of the saved models (the resume state is always fp32)"},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue from the latest checkpoint in output_dir"},
    )
    report_to: Literal["none", "wandb", "tensorboard"] = field(
        default="none",
        metadata={"help": "also report to wandb or tensorboard (log.jsonl is always written)"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "data order, sampling and initialisation"},
    )


# ----------------------------------------------------------------------------------------------------
# The math: pure functions (tested alone in tests/test_rl.py; copy them freely)

def group_advantages(rewards, group_size, scale_by_std=True):
    """GRPO advantages. rewards: [num_groups * group_size], group-contiguous.
    (r - group mean) / (group std + 1e-4) with the unbiased std; no std division (Dr. GRPO) when
    scale_by_std=False. A group whose rewards are all equal gets exactly zero advantage."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # [groups, G]
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    same = r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values
    return adv.masked_fill(same, 0.0).view(-1)  # [groups * G]


def policy_loss(logprobs, old_logprobs, advantages, mask, num_tokens=None, eps_low=0.2, eps_high=0.28,
                ref_logprobs=None, beta=0.0):
    """Clipped GRPO loss with clip-higher, summed over the masked tokens and divided by `num_tokens`.
    logprobs, old_logprobs, ref_logprobs, mask: [B, T]; advantages: [B] (or [B, T] per token).
    Per token: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3-KL(ref).

    num_tokens: what the token-level mean (DAPO) runs over. None: this batch's masked tokens. When a
    step is split into micro-batches and ranks, pass the step's masked tokens over all ranks divided
    by the number of ranks (their gradients are averaged): the micro-batch losses then add up to the
    step's token mean, exactly."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if ref_logprobs is not None:
        log_r = ref_logprobs - logprobs
        kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(pi || ref), >= 0, [B, T]
        if beta:
            per_token = per_token + beta * kl
    n = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / (n if num_tokens is None else max(num_tokens, 1e-9))
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clip_fraction": ((clipped * mask).sum() / n).item(),  # this batch's token means
                 "ratio_mean": ((ratio * mask).sum() / n).item(),
                 "kl": ((kl * mask).sum() / n).item() if kl is not None else 0.0}
    return loss, stats


def tis_weights(old_logprobs, sampler_logprobs, cap):
    """Truncated importance sampling: min(pi_train / pi_sampler, cap) per token ([B, T]), for the gap
    between the trainer's log-probs and the ones the sampler (vLLM) drew with."""
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap)


def lr_factor(update, warmup_updates, total_updates, schedule="constant"):
    """Learning-rate multiplier: linear warm-up, then constant or cosine to 0."""
    if update < warmup_updates:
        return (update + 1) / warmup_updates
    if schedule == "cosine":
        progress = (update - warmup_updates) / max(1, total_updates - warmup_updates)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def compute_rewards(texts, lengths, row, cfg):
    """Rewards of one group's completions, and each component for the log. The paper's reward is the
    accuracy alone: 1 if the extracted answer is equivalent to the gold answer, else 0. Returns
    (None, metrics) when the gold answer cannot be parsed: the group is skipped (no loss) and counted.
    Add a component here: compute it, add it to `total`, put it in `metrics`."""
    n = len(texts)
    accuracy = rewards.accuracy_reward(texts, [row["answer"]] * n, [row["options"]] * n if row["options"]
                                       else None, lenient=cfg.lenient_extraction)
    if any(a is None for a in accuracy):
        return None, {}
    total, metrics = list(accuracy), {"accuracy": accuracy}
    if cfg.format_reward_weight:
        fmt = rewards.format_reward(texts)
        total = [t + cfg.format_reward_weight * f for t, f in zip(total, fmt)]
        metrics["format_reward"] = fmt
    if cfg.overlong_penalty:
        pen = rewards.overlong_penalty(lengths, cfg.max_response_length, cfg.overlong_buffer)
        total = [t + p for t, p in zip(total, pen)]
        metrics["overlong_penalty"] = pen
    return total, metrics


# ----------------------------------------------------------------------------------------------------
# Data: rows {question, answer, options, images} from Orz-math pairs or question/answer files

def normalize_row(raw, i, source, base_dir=""):
    """One training row as {question, answer, options, images}; errors name the file, row and field."""
    if isinstance(raw, list):  # Orz-math-57k: [{from: human, value}, {from: assistant, ground_truth: {value}}]
        try:
            question, gold = raw[0]["value"], raw[1]["ground_truth"]["value"]
        except (IndexError, KeyError, TypeError) as e:
            raise ValueError(f"{source}: row {i}: Orz-math pair without {e} (expected [{{from: human, value}}, "
                             f"{{from: assistant, ground_truth: {{value}}}}])") from None
        return {"question": question, "answer": str(gold), "options": None, "images": []}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: row {i}: expected an Orz-math pair or a dict, got {type(raw).__name__}")
    question = raw.get("question", raw.get("problem"))
    if question is None:
        raise ValueError(f"{source}: row {i}: missing field 'question' (have: {sorted(raw)})")
    options = raw.get("options") or None
    gold = raw.get("answer_idx") if options and raw.get("answer_idx") else raw.get("answer")  # MedQA: the letter
    if gold is None:
        raise ValueError(f"{source}: row {i}: missing field 'answer' (have: {sorted(raw)})")
    gold = rewards.final_answer(gold)  # GSM8K's worked answer ends with "#### N"
    images = raw.get("images") or ([raw["image"]] if raw.get("image") is not None else [])
    images = [os.path.join(base_dir, im) if isinstance(im, str) else im for im in images]
    return {"question": question, "answer": gold, "options": options, "images": images}


def build_prompt(processor, row, template="paper"):
    """The paper's training prompt (or its multiple-choice prompt; or the plain question) in the chat template."""
    text = rewards.pose(row["question"], row["options"], template, kind="train")
    content = [{"type": "image"} for _ in row["images"]] + [{"type": "text", "text": text}] if row["images"] else text
    return generation.chat_prompt(processor, [{"role": "user", "content": content}])


def encode_prompt(processor, tokenizer, prompt, images):
    """Prompt token ids as the generator saw them, plus the vision inputs (image tokens expanded)."""
    if images:
        enc = processor(text=[prompt], images=images, return_tensors="pt")
        return enc["input_ids"][0].tolist(), {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], {}


def step_prompt_indices(step, num_rows, prompts_per_step, seed):
    """The global prompts of a step: a fresh shuffle each epoch, a deterministic function of (seed, step)."""
    steps_per_epoch = num_rows // prompts_per_step
    epoch, pos = divmod(step, steps_per_epoch)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[pos * prompts_per_step:(pos + 1) * prompts_per_step]


def shared_prompts(samples, cfg) -> bool:
    """Whether the loss pass lays each group's prompt out once per row (only sdpa_packed reads that)."""
    return (cfg.packing and cfg.share_prompts and cfg.attn_implementation == common.PACKED_SDPA
            and all(s.get("group") is not None for s in samples))


def _shares(samples, row, k, share):
    """Whether row[k] continues the prompt of row[k - 1] (same group) instead of repeating it."""
    return share and k > 0 and samples[row[k]]["group"] == samples[row[k - 1]]["group"]


def _row_width(samples, row, share):
    """Tokens a row lays out: a shared prompt once, then only its last token per further sample."""
    width = 0
    for k, i in enumerate(row):
        prompt = 1 if _shares(samples, row, k, share) else len(samples[i]["prompt_ids"])
        width += prompt + len(samples[i]["completion_ids"])
    return width


def microbatches(samples, cfg):
    """Split the step's samples into micro-batches of rows (lists of sample indices).
    packing: sequences bin-packed (first-fit decreasing) into rows no longer than the step's longest
    sequence, rows grouped into micro-batches of at most `micro_batch_tokens` tokens (padding included),
    so a step needs as few forward/backward passes as its tokens require. With shared prompts the
    packed units are runs of one group's samples (one prompt copy each, rows up to micro_batch_tokens).
    Otherwise: one sequence per row, `micro_batch_size` rows per micro-batch, in sample order (the
    padded path)."""
    lengths = [len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples]
    if not cfg.packing:
        rows = [[i] for i in range(len(samples))]
        return [rows[i:i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
    share = shared_prompts(samples, cfg)
    if share:
        cap, units, widths = max(max(lengths), cfg.micro_batch_tokens), [], []
        for i, s in enumerate(samples):  # a group's samples are consecutive
            extra = 1 + len(s["completion_ids"])  # after the first: the prompt's last token + completion
            if units and samples[units[-1][-1]]["group"] == s["group"] and widths[-1] + extra <= cap:
                units[-1].append(i)
                widths[-1] += extra
            else:
                units.append([i])
                widths.append(lengths[i])
        rows = [[i for u in row for i in units[u]] for row in common.pack_rows(widths, cap)]
    else:
        rows = common.pack_rows(lengths, max(lengths))
    sized = sorted(((_row_width(samples, row, share), row) for row in rows), key=lambda x: -x[0])
    mbs, widest = [], 0
    for width, row in sized:  # widest rows first: a micro-batch's rows pad to its first row's width
        if mbs and (len(mbs[-1]) + 1) * widest <= cfg.micro_batch_tokens:
            mbs[-1].append(row)
        else:
            mbs.append([row])
            widest = width
    return mbs


def collate(samples, rows, pad_id, device, placeholders=(), share_prompts=False):
    """Rows of samples (prompt + completion, each with position ids from 0) -> model inputs.

    Everything per token is laid out [R, W] at the column whose logits predict it: completion token j
    of a sample starting at column t with a prompt of P tokens sits at t + P - 1 + j (targets, mask,
    advantages, sampler / old / reference log-probs; 0 / -100 elsewhere). Qwen2.5-VL gets 4-row
    position ids [4, R, W] (text positions, which mark the sequence boundaries, + the 3 M-RoPE rows).
    share_prompts: a sample right after one of its group lays out only its prompt's last token and its
    completion, at positions P - 1, P, ...; common.packed_sdpa lets it attend to the first P - 1
    tokens of the earlier copy (the prompt), so its completion token j sits at t + j.
    `placeholders`: image/video token ids; one sampled inside a completion is fed as padding."""
    W = max(_row_width(samples, row, share_prompts) for row in rows)
    R = len(rows)
    ids = torch.full((R, W), pad_id, dtype=torch.long)
    targets = torch.full((R, W), -100, dtype=torch.long)
    pos = torch.zeros((R, W), dtype=torch.long)
    mrope = any(samples[i].get("rope") is not None for row in rows for i in row)
    rope = torch.zeros((3, R, W), dtype=torch.long)
    per_token = {k: torch.zeros((R, W)) for k in ("mask", "advantages", "sampler_logprobs", "old_logprobs",
                                                  "ref_logprobs")}
    vision, spans = [], []
    for r, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row):
            s = samples[i]
            p, c = s["prompt_ids"], s["completion_ids"]
            skip = len(p) - 1 if _shares(samples, row, k, share_prompts) else 0  # prompt tokens already there
            n = len(p) + len(c) - skip
            ids[r, t:t + n] = torch.tensor(p[skip:] + [pad_id if x in placeholders else x for x in c])
            pos[r, t:t + n] = torch.arange(skip, skip + n)
            rope[:, r, t:t + n] = torch.arange(skip, skip + n) if s.get("rope") is None else s["rope"][:, skip:]
            cols = slice(t + len(p) - 1 - skip, t + n - 1)  # the columns predicting the completion's tokens
            spans.append((i, r, cols))
            targets[r, cols] = torch.tensor(c)
            per_token["mask"][r, cols] = torch.tensor(s["loss_mask"], dtype=torch.float32)
            per_token["advantages"][r, cols] = s["advantage"]
            for key in ("sampler_logprobs", "old_logprobs", "ref_logprobs"):
                if key in s:
                    per_token[key][r, cols] = torch.as_tensor(s[key], dtype=torch.float32)
            if s["vision"] and not skip:
                vision.append(s["vision"])  # row-major: the order of the image tokens in the batch
            t += n
        end = skip + n  # padding continues the last sequence: no real token sees it
        pos[r, t:] = torch.arange(end, end + W - t)
        rope[:, r, t:] = torch.arange(end, end + W - t)
    batch = {"input_ids": ids, "targets": targets, "position_ids": torch.cat([pos[None], rope]) if mrope else pos,
             **{k: v for k, v in per_token.items() if k in ("mask", "advantages", "sampler_logprobs")
                or any(k in samples[i] for row in rows for i in row)}}
    if vision:
        batch["pixel_values"] = torch.cat([v["pixel_values"] for v in vision])
        batch["image_grid_thw"] = torch.cat([v["image_grid_thw"] for v in vision])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["spans"] = spans  # (sample index, row, columns): to read per-sample values back
    return batch


def completion_logprobs(model, batch, temperature, with_entropy=False):
    """log pi(token) under log_softmax(logits / T) (the distribution the sampler drew from) at every
    column of `collate`'s layout that predicts a completion token, and the entropy there: [R, W] each
    (0 elsewhere). model: a common.LogProbModel (the LM head runs only on those columns, in chunks)."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw") if k in batch}
    return model(targets=batch["targets"], temperature=temperature, with_entropy=with_entropy,
                 attention_mask=None, **inputs)


# ----------------------------------------------------------------------------------------------------
# The loop's steps (main() calls them in the docstring's order)

def rollout(engine, model, rows, indices, cfg, seed):
    """1. Sample `num_generations` completions for each row's prompt: one dict per group."""
    groups = [{"row": rows[i], "images": [common.open_image(im) for im in rows[i]["images"]]} for i in indices]
    prompts = [{"prompt": g["row"]["prompt"], "images": g["images"]} for g in groups]
    # hf: the policy generates; under FSDP2 its shards are gathered first (generate's forward calls
    # differ between ranks, so no collective may run inside it)
    with common.gathered_weights(model) if cfg.backend == "hf" else nullcontext():
        model.eval()
        outs = generation.generate(
            engine, prompts, n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_response_length, think_budget=cfg.think_budget, return_logprobs=True,
            seed=seed, batch_size=cfg.generation_batch_size)
        model.train()
    for g, completions in zip(groups, outs):
        g["completions"] = completions
    return groups


def score(groups, cfg):
    """2. Rewards of every group (None: unparseable gold, the group is skipped)."""
    for g in groups:
        texts, lengths = [c.text for c in g["completions"]], [len(c.token_ids) for c in g["completions"]]
        g["rewards"], g["metrics"] = compute_rewards(texts, lengths, g["row"], cfg)
    return groups


def has_signal(g):
    return g["rewards"] is not None and len(set(g["rewards"])) > 1


def dynamic_sampling(groups, sample_more, cfg):
    """DAPO: keep the groups with a learning signal, refill from fresh prompts (bounded rounds); the
    same number of groups as before, groups still missing keep zero advantage. -> (groups, refilled)."""
    keep, refilled = [g for g in groups if has_signal(g)], 0
    for round_ in range(cfg.dynamic_sampling_max_rounds):
        if len(keep) >= len(groups):
            break
        new = sample_more(len(groups) - len(keep), round_)
        refilled += len(new)
        keep += [g for g in new if has_signal(g)]
    rest = [g for g in groups if not has_signal(g) and g["rewards"] is not None]
    return (keep + rest + [g for g in groups if g["rewards"] is None])[:len(groups)], refilled


def make_samples(groups, cfg, processor, tokenizer, placeholders, rope_index=None):
    """3. Group-normalised advantages, and one training sample per completion (with its M-RoPE
    positions, [3, L], for Qwen2.5-VL prompts with images)."""
    G = cfg.num_generations
    flat = [r for g in groups for r in (g["rewards"] if g["rewards"] is not None else [0.0] * G)]
    advantages = group_advantages(flat, G, cfg.scale_rewards).tolist()
    samples = []
    for gi, g in enumerate(groups):
        prompt_ids, vision = encode_prompt(processor, tokenizer, g["row"]["prompt"], g["images"])
        for j, c in enumerate(g["completions"]):
            rope = None
            if rope_index is not None and vision:  # positions of prompt + completion, images included
                fed = [tokenizer.pad_token_id if t in placeholders else t for t in c.token_ids]  # as collate
                ids = torch.tensor([prompt_ids + (fed or [tokenizer.pad_token_id])])
                rope = rope_index(ids, vision["image_grid_thw"])
            train_on = g["rewards"] is not None and not (
                c.finish_reason == "length" and cfg.mask_truncated_completions)
            forced = c.forced_mask or [0] * len(c.token_ids)  # forced `</think>`: context, no loss
            mask = [int(train_on and not f and t not in placeholders) for t, f in zip(c.token_ids, forced)]
            samples.append({"prompt_ids": prompt_ids, "vision": vision, "rope": rope,
                            "completion_ids": list(c.token_ids) or [tokenizer.pad_token_id],
                            "loss_mask": mask or [0], "advantage": advantages[gi * G + j],
                            "sampler_logprobs": list(c.logprobs or [0.0] * len(c.token_ids)) or [0.0],
                            "group": gi})
    return samples


def set_lr(optimizer, cfg, update, total_updates):
    """Linear warm-up over warmup_ratio of the updates, then constant or cosine; returns the lr."""
    lr = cfg.learning_rate * lr_factor(update, int(cfg.warmup_ratio * total_updates), total_updates,
                                       cfg.lr_scheduler)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def add_train_stats(train, batch, logp, entropy, w, stats, cfg, first_pass):
    """Accumulate the loss pass's diagnostics (token sums; divided by the step's tokens in the log):
    clip fraction, and on the first pass over the batch as sampled: KL, entropy, the gap between the
    trainer's and the sampler's log-probs, and how often the TIS weight hit its cap."""
    mask = batch["mask"]
    n_tok = mask.sum().item()
    train["clip"] += stats["clip_fraction"] * n_tok / cfg.num_iterations
    if first_pass:
        gap = (logp.detach() - batch["sampler_logprobs"]).abs() * mask
        train["gap_max"] = max(train["gap_max"], gap.max().item())
        train["tokens"] += n_tok
        train["gap"] += gap.sum().item()
        train["kl"] += stats["kl"] * n_tok
        train["entropy"] += (entropy * mask).sum().item()
        train["tis_clipped"] += ((w >= cfg.tis_cap) * mask).sum().item() if w is not None else 0.0


def group_sums(groups, cfg):
    """Per-rank sums of what the log reports about the samples (summed over ranks, then divided).
    The same keys on every rank, whatever its groups (the all-reduce adds them position by position)."""
    components = ["accuracy"] + ["format_reward"] * bool(cfg.format_reward_weight) + [
        "overlong_penalty"] * cfg.overlong_penalty
    s = dict.fromkeys(["groups", "zero_var_groups", "skipped_groups", "completions", "scored",
                       "reward_sum", "reward_sq_sum", "response_tokens", "truncated", "forced_exits"]
                      + [f"{c}_sum" for c in components], 0.0)
    for g in groups:
        comps, r = g["completions"], g["rewards"]
        s["groups"] += 1
        s["skipped_groups"] += r is None
        s["zero_var_groups"] += r is not None and not has_signal(g)
        s["completions"] += len(comps)
        s["response_tokens"] += sum(len(c.token_ids) for c in comps)
        s["truncated"] += sum(c.finish_reason == "length" for c in comps)
        s["forced_exits"] += sum(c.forced_exit for c in comps)
        if r is not None:
            s["scored"] += len(r)
            s["reward_sum"] += sum(r)
            s["reward_sq_sum"] += sum(x * x for x in r)
            for k, v in g["metrics"].items():
                s[f"{k}_sum"] += sum(v)
    return s


def step_log(s, maxes, step, lr, grad_norm, t_step):
    """The log record of a step from the all-rank sums `s` and maxima `maxes`."""
    scored, tok, n = max(s["scored"], 1), max(s["train_tokens"], 1), max(s["completions"], 1)
    mean = s["reward_sum"] / scored
    log = {"step": step, "reward_mean": mean,
           "reward_std": math.sqrt(max(s["reward_sq_sum"] / scored - mean ** 2, 0.0)),
           "zero_var_group_frac": s["zero_var_groups"] / max(s["groups"], 1),
           "skipped_groups": int(s["skipped_groups"]), "refill_groups": int(s["refill_groups"]),
           "response_length_mean": s["response_tokens"] / n,
           "response_length_max": int(maxes["response_length_max"]), "truncation_rate": s["truncated"] / n,
           "forced_exit_rate": s["forced_exits"] / n, "clip_fraction": s["train_clip"] / tok,
           "kl": s["train_kl"] / tok, "entropy": s["train_entropy"] / tok, "grad_norm": grad_norm,
           "logprob_gap_mean": s["train_gap"] / tok, "logprob_gap_max": maxes["logprob_gap_max"],
           "tis_clipped_frac": s["train_tis_clipped"] / tok, "lr": lr, "train_tokens": int(s["train_tokens"]),
           "gen_tokens_per_s": s["response_tokens"] / max(maxes["time_generate"], 1e-9),
           "train_tokens_per_s": s["train_tokens"] / max(maxes["time_train"], 1e-9),
           "time_generate": maxes["time_generate"], "time_score": maxes["time_score"],
           "time_train": maxes["time_train"], "time_sync": maxes["time_sync"], "time_step": time.time() - t_step}
    for k in [k for k in s if k.endswith("_sum") and k not in ("reward_sum", "reward_sq_sum")]:
        log[k[:-len("_sum")]] = s[k] / scored  # accuracy and each reward component, per completion
    return log


def load_prompts(cfg, processor, tokenizer):
    """Training rows with their chat prompts; over-long prompts dropped (an image prompt is never cut)."""
    raw, base_dir = common.load_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config)
    rows, dropped = [], 0
    for i, r in enumerate(raw):
        row = normalize_row(r, i, cfg.dataset, base_dir)
        row["prompt"] = build_prompt(processor, row, cfg.prompt_template)
        images = [common.open_image(im) for im in row["images"]]
        if len(encode_prompt(processor, tokenizer, row["prompt"], images)[0]) > cfg.max_prompt_length:
            dropped += 1
        else:
            rows.append(row)
    if len(rows) < cfg.prompts_per_step:
        raise ValueError(f"{cfg.dataset}: {len(rows)} usable prompts ({dropped} longer than "
                         f"--max_prompt_length {cfg.max_prompt_length}) < --prompts_per_step "
                         f"{cfg.prompts_per_step}")
    return rows, dropped


def load_policy(path, cfg, device, world, trainable, touch_vision=False):
    """An HF model in a LogProbModel, sharded over the processes (FSDP2). trainable=False: the frozen
    reference, kept in bf16 on GPUs (half the memory, as TRL and verl keep it)."""
    bf16 = cfg.bf16 and device.type == "cuda"
    model = common.load_model(path, device, world, torch.bfloat16 if bf16 and not trainable else torch.float32,
                              cfg.attn_implementation)
    if trainable:
        common.freeze_vision(model, cfg.freeze_vision_tower, cfg.freeze_projector)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.requires_grad_(False)
    return common.shard_model(common.LogProbModel(model, cfg.logprob_chunk_size, touch_vision), device,
                              world, bf16)


# ----------------------------------------------------------------------------------------------------

def main(cfg: Config):
    # ==== set-up: processes, data, policy, reference, optimizer, engine; resume ====
    if cfg.temperature <= 0:
        raise ValueError("--temperature must be > 0 for RL (the log-probs are taken after temperature)")
    rank, world, device = common.init_distributed()
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the {world} "
                         "processes")
    per_rank, G, main_proc = cfg.prompts_per_step // world, cfg.num_generations, rank == 0
    torch.manual_seed(cfg.seed)
    rewards.start_workers()  # the math checkers set themselves up on other cores meanwhile
    resume_dir = common.resume_dir(cfg.output_dir, cfg.resume)  # refuses an earlier run's folder
    os.makedirs(cfg.output_dir, exist_ok=True)
    processor, tokenizer = generation.load_processor(cfg.model_name_or_path)
    rows, num_filtered = load_prompts(cfg, processor, tokenizer)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * (len(rows) // cfg.prompts_per_step)
    total_updates, max_images = total_steps * cfg.num_iterations, max(len(r["images"]) for r in rows)
    n_images = sum(len(r["images"]) for r in rows)  # text-only data: 0, and the first log line says so
    model = load_policy(cfg.model_name_or_path, cfg, device, world, True, touch_vision=max_images > 0)
    ref_model = load_policy(cfg.model_name_or_path, cfg, device, world, False) if cfg.beta > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]  # the sharded ones: after sharding
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    policy = model.model  # the HF model (its parameters are FSDP2 shards under several processes)
    placeholders = {getattr(policy.config, k, None) for k in ("image_token_id", "video_token_id")} - {None}
    rope_index = common.make_rope_index(policy, policy.config.image_token_id) if max_images else None
    start_step = common.load_training_state(resume_dir, model, optimizer)["step"] if resume_dir else 0
    if main_proc:  # the log and the samples must match the checkpoint we continue from
        for name in ("log.jsonl", "completions.jsonl"):
            common.truncate_log(os.path.join(cfg.output_dir, name), start_step)
    tracker = common.Tracker(cfg.output_dir, cfg.report_to, "x-reasoner-rl", asdict(cfg), main_proc)
    amp = torch.autocast("cuda", torch.bfloat16) if cfg.bf16 and device.type == "cuda" and world == 1 \
        else nullcontext()  # FSDP2 casts to bf16 itself
    common.print0(f"rl.py: {len(rows)} prompts ({num_filtered} over {cfg.max_prompt_length} tokens "
                  f"dropped; {n_images} images), {total_steps} steps of {cfg.prompts_per_step} prompts x {G} completions on "
                  f"{world} process(es), backend {cfg.backend}"
                  + (f", resuming at step {start_step} from {resume_dir}" if resume_dir else ""))
    if cfg.backend == "hf":  # the policy generates itself: weight sync is free
        engine = generation.load_engine(cfg.model_name_or_path, "hf", model=policy, processor=processor,
                                        seed=cfg.seed)
    else:
        engine = generation.load_engine(
            cfg.model_name_or_path, "vllm", processor=processor, seed=cfg.seed,  # + rank inside
            tensor_parallel_size=cfg.vllm_tensor_parallel_size, dtype=cfg.vllm_dtype,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_model_len=cfg.max_prompt_length + cfg.max_response_length,
            enable_sleep_mode=cfg.vllm_sleep and torch.cuda.is_available(),
            kv_cache_memory_bytes=cfg.vllm_kv_cache_memory_bytes,
            max_images_per_prompt=max_images)  # text-only data: no image profiling, no vision memory
        if resume_dir:
            generation.sync_weights(engine, policy)

    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not main_proc,
               desc="rl")
    for step in bar:
        # sampling seeds follow the global prompt index: the same samples on any number of ranks (hf:
        # with --generation_batch_size = num_generations; vLLM always)
        t_step, seed = time.time(), cfg.seed + step * 1_000_003 + rank * per_rank * G
        # ==== 1. generate: whole groups for this rank's share of the step's prompts ====
        t0 = time.time()
        indices = step_prompt_indices(step, len(rows), cfg.prompts_per_step, cfg.seed)
        groups = rollout(engine, model, rows, indices[rank * per_rank:(rank + 1) * per_rank], cfg, seed)
        t_gen = time.time() - t0

        # ==== 2. rewards (+ DAPO dynamic sampling, off in the paper) ====
        t0, refilled = time.time(), 0
        groups = score(groups, cfg)
        if cfg.dynamic_sampling:
            rng = random.Random(seed)
            groups, refilled = dynamic_sampling(groups, lambda k, r: score(rollout(
                engine, model, rows, rng.sample(range(len(rows)), k), cfg, seed + 500_000 + 10_000 * r), cfg), cfg)
        generation.sleep(engine)  # vLLM: hand its GPU memory to the trainer (no-op for hf)
        t_score = time.time() - t0

        # ==== 3. advantages, per group (groups never span ranks) ====
        t0 = time.time()
        samples = make_samples(groups, cfg, processor, tokenizer, placeholders, rope_index)
        # the token-level mean runs over every masked token of the step, on every rank
        step_tokens = common.all_reduce([sum(sum(s["loss_mask"]) for s in samples)])[0]
        share = shared_prompts(samples, cfg)
        batches = [collate(samples, rows_, tokenizer.pad_token_id, device, placeholders, share)
                   for rows_ in microbatches(samples, cfg)]  # per token: [R, W] in collate's layout
        # every rank runs the same number of passes (under FSDP2 each is a collective): a rank with fewer
        # repeats its last micro-batch with the loss mask zeroed (it trains nothing)
        passes = int(common.all_reduce([len(batches)], op="max")[0])
        batches += [{**batches[-1], "mask": torch.zeros_like(batches[-1]["mask"])}] * (passes - len(batches))

        # ==== 4. log-probs before the update: the old policy (several updates only), the reference ====
        with torch.no_grad(), amp:
            for key, m in (("old_logprobs", model if cfg.num_iterations > 1 else None), ("ref_logprobs", ref_model)):
                for batch in batches if m is not None else []:
                    batch[key] = completion_logprobs(m, batch, cfg.temperature)[0]  # [R, W]

        # ==== 5. update: clipped, token-level policy gradient over the whole step ====
        train = dict.fromkeys(["tokens", "clip", "kl", "entropy", "gap", "gap_max", "tis_clipped"], 0.0)
        for it in range(cfg.num_iterations):
            lr = set_lr(optimizer, cfg, step * cfg.num_iterations + it, total_updates)
            for batch in batches:
                with amp:
                    logp, entropy = completion_logprobs(model, batch, cfg.temperature, with_entropy=it == 0)
                old = batch.get("old_logprobs", logp.detach())  # on-policy: ratio 1, gradient A * grad log pi
                # truncated importance sampling: weighting A weights the token's clipped term (w > 0)
                w = tis_weights(old, batch["sampler_logprobs"], cfg.tis_cap) if cfg.tis_cap > 0 else None
                adv = batch["advantages"] * w if w is not None else batch["advantages"]  # [R, W]
                loss, stats = policy_loss(logp, old, adv, batch["mask"], step_tokens / world, cfg.eps_low,
                                          cfg.eps_high, batch.get("ref_logprobs"), cfg.beta)
                loss.backward()  # FSDP2 reduce-scatters into fp32 gradient shards; they accumulate
                add_train_stats(train, batch, logp, entropy, w, stats, cfg, first_pass=it == 0)
            grad_norm = common.grad_norm_and_clip(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_train = time.time() - t0

        # ==== 6. update the inference engine (vLLM: wake the weights, push, then the KV cache) ====
        t0 = time.time()
        if cfg.backend == "vllm":
            generation.wake_up(engine, ["weights"])
            generation.sync_weights(engine, policy)  # streamed one tensor at a time, in vLLM's dtype
            generation.wake_up(engine, ["kv_cache"])
        t_sync = time.time() - t0

        # ==== 7. log: metrics summed over ranks ====
        gap_max = train.pop("gap_max")
        sums = {**group_sums(groups, cfg), **{f"train_{k}": v for k, v in train.items()}, "refill_groups": refilled}
        keys = sorted(sums)  # every rank must reduce the same keys in the same order
        sums = dict(zip(keys, common.all_reduce([sums[k] for k in keys])))
        maxes = dict(zip(["response_length_max", "logprob_gap_max", "time_generate", "time_score", "time_train",
                          "time_sync"], common.all_reduce([max((len(c.token_ids) for g in groups for c in
                                                                g["completions"]), default=0), gap_max,
                                                           t_gen, t_score, t_train, t_sync], op="max")))
        log = step_log(sums, maxes, step + 1, lr, grad_norm, t_step)
        if step == start_step:
            log.update({"data/prompts": len(rows), "data/images": n_images})
        tracker.log(log)
        if main_proc:
            g = groups[0]  # one sample per step, to read what the policy writes
            with open(os.path.join(cfg.output_dir, "completions.jsonl"), "a") as f:
                f.write(json.dumps({"step": step + 1, "prompt": g["row"]["prompt"], "gold": g["row"]["answer"],
                                    "completion": g["completions"][0].text,
                                    "reward": g["rewards"][0] if g["rewards"] else None}) + "\n")
        bar.set_postfix(reward=f"{log['reward_mean']:.3f}", len=f"{log['response_length_mean']:.0f}",
                        kl=f"{log['kl']:.4f}", clip=f"{log['clip_fraction']:.3f}")

        # ==== 8. save ====
        if cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0 and step + 1 < total_steps:
            common.save_checkpoint(cfg.output_dir, step + 1, model, optimizer, processor,
                                   {"step": step + 1, "config": asdict(cfg)}, cfg.save_total_limit,
                                   getattr(torch, cfg.save_dtype))

    if cfg.save_steps > 0:  # the resumable state at the end too
        common.save_checkpoint(cfg.output_dir, total_steps, model, optimizer, processor,
                               {"step": total_steps, "config": asdict(cfg)}, cfg.save_total_limit,
                               getattr(torch, cfg.save_dtype))
    common.save_pretrained(cfg.output_dir, policy, processor, getattr(torch, cfg.save_dtype))
    common.print0(f"rl.py: saved the policy to {cfg.output_dir}")
    tracker.close()
    common.barrier()  # (not destroy_process_group: vLLM's exit clean-up still uses it)


if __name__ == "__main__":
    main(common.parse_config(Config, __doc__))
