"""Stage 2 of X-Reasoner: GRPO with verifiable rewards on text-only math (Orz-math-57k).

    # the paper's recipe (vLLM colocated on every GPU, one trainer shard per GPU)
    torchrun --nproc_per_node 8 rl.py --model_name_or_path out/sft --dataset orz_math_57k_collected.json \
        --output_dir out/rl
    # on a CPU, with transformers' generate instead of vLLM
    python rl.py --backend hf --model_name_or_path tiny-vl --dataset toy/rl/orz_math.json --output_dir /tmp/rl \
        --max_steps 2 --prompts_per_step 4 --num_generations 4 --max_response_length 32

One step, as the numbered sections of the loop read:
  1. take `prompts_per_step` prompts; each rank samples `num_generations` completions for its share
     (whole groups: a group never spans ranks, so advantages need no communication),
  2. score them: 1 if the extracted answer is equivalent to the gold answer, else 0 (no format reward),
  3. group-normalised advantages (r - mean) / (std + 1e-4),
  4. log-probs of the sampling policy (trainer side) and of the frozen reference (only when beta > 0),
  5. clipped policy-gradient update with clip-higher and a token-level loss over the whole step (DAPO),
  6. push the new weights into vLLM,
  7. log (JSONL + tqdm), 8. save an atomic checkpoint (`--resume` continues from the latest).

Data: Orz-math-57k's JSON (a list of [{from: human, value}, {from: assistant, ground_truth: {value}}]
pairs), or rows with `question` and `answer` (optional `options`, list or letter->text dict, posed with
the multiple-choice prompt, e.g. MedQA for X-Reasoner-Med; optional `images`, paths relative to the file).
"""

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm import tqdm
from transformers import HfArgumentParser

import generation
import rewards


@dataclass
class Config:
    model_name_or_path: str = field(metadata={"help": "policy to start from (paper: the SFT model from sft.py on Qwen2.5-VL-7B-Instruct)"})
    dataset: str = field(metadata={"help": "JSON / JSONL / Parquet file, a save_to_disk folder or a hub id (paper: Orz-math-57k)"})
    output_dir: str = field(metadata={"help": "checkpoints, log.jsonl, completions.jsonl and the final model"})
    dataset_split: str = field(default="train", metadata={"help": "split, for hub ids and save_to_disk folders"})
    prompt_template: str = field(default="paper", metadata={"help": "'paper': the paper's training / MCQ prompt; 'plain': the question alone (plain: for tiny toy models, which cannot find a problem behind the paper's long instructions)"})
    max_prompt_length: int = field(default=1024, metadata={"help": "longer prompts are dropped (never truncated) and counted (paper: not stated)"})
    # generation
    backend: str = field(default="vllm", metadata={"help": "'vllm' (colocated engine, GPUs) or 'hf' (transformers generate: CPU, tests)"})
    num_generations: int = field(default=8, metadata={"help": "completions per prompt, the GRPO group (paper: 8)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; the trainer's log-probs use it too (paper: 1.0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (paper: 1.0)"})
    max_response_length: int = field(default=4096, metadata={"help": "cap on completion tokens (paper: 4096)"})
    think_budget: Optional[int] = field(default=None, metadata={"help": "forced exit during RL: close </think> after this many tokens (paper: off)"})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "DAPO overlong filtering: truncated completions get no loss. Off (paper): RL cut truncated responses, which needs them scored 0 and trained on"})
    dynamic_sampling: bool = field(default=False, metadata={"help": "DAPO: replace groups with equal rewards by fresh ones (paper: off)"})
    dynamic_sampling_max_rounds: int = field(default=3, metadata={"help": "refill rounds per step; still-missing groups keep zero advantage"})
    tis_cap: float = field(default=2.0, metadata={"help": "truncated importance sampling: weight each token by min(pi_train/pi_sampler, cap), correcting the numeric gap between vLLM's and the trainer's log-probs (after the paper; 0 = off)"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences per hf `generate` call (hf backend only)"})
    # optimisation
    prompts_per_step: int = field(default=128, metadata={"help": "prompts per optimizer step, all ranks together (paper: 128)"})
    micro_batch_size: int = field(default=2, metadata={"help": "sequences per forward/backward on a rank: memory only, the math is unchanged"})
    num_epochs: int = field(default=3, metadata={"help": "passes over the prompts (paper: 3, stopped once the reward converges)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many steps (-1: num_epochs passes)"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer updates per generated batch; 1 = on-policy, as the paper"})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW (paper: 3e-6)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "(paper: 1e-2)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "(paper: not stated; AdamW's default)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "(paper: not stated; AdamW's default)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up over this fraction of the updates (paper: 10%%)"})
    lr_scheduler: str = field(default="constant", metadata={"help": "after warm-up: 'constant' (verl's default; paper: not stated) or 'cosine'"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip (paper: 1.0)"})
    beta: float = field(default=1e-2, metadata={"help": "k3 KL penalty to the frozen starting model (paper: 1e-2); 0 = no reference model"})
    eps_low: float = field(default=0.2, metadata={"help": "ratio clip below 1 (paper: 0.2)"})
    eps_high: float = field(default=0.28, metadata={"help": "clip-higher above 1 (paper: 'clip-higher', value not given; DAPO's 0.28)"})
    scale_rewards: bool = field(default=True, metadata={"help": "divide advantages by the group std (GRPO, paper); False = Dr. GRPO"})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "paper: frozen vision encoder"})
    freeze_merger: bool = field(default=False, metadata={"help": "the vision-to-language projector (paper: not stated)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory on long responses"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on GPUs (weights and optimizer stay float32); ignored on CPUs"})
    # vLLM
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU memory fraction vLLM may take next to the trainer"})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per engine"})
    vllm_sleep: bool = field(default=True, metadata={"help": "free vLLM's GPU memory while training (GPUs only)"})
    vllm_dtype: str = field(default="auto", metadata={"help": "vLLM's weight dtype ('auto': the checkpoint's; bf16 on GPUs for the paper's model)"})
    vllm_kv_cache_memory_bytes: Optional[int] = field(default=None, metadata={"help": "fixed KV cache size instead of the fraction (CPU tests)"})
    # bookkeeping
    save_steps: int = field(default=50, metadata={"help": "checkpoint every this many steps (0 = only the final model)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep this many checkpoints"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})
    seed: int = field(default=0, metadata={"help": "data order, sampling and initialisation"})


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


def policy_loss(logprobs, old_logprobs, advantages, mask, eps_low=0.2, eps_high=0.28, ref_logprobs=None,
                beta=0.0):
    """Clipped GRPO loss with clip-higher, averaged over all masked tokens (token-level, DAPO).
    logprobs, old_logprobs, ref_logprobs, mask: [B, T]; advantages: [B] (or [B, T] per token).
    Per token: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3-KL(ref)."""
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
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clip_fraction": ((clipped * mask).sum() / n).item(),
                 "ratio_mean": ((ratio * mask).sum() / n).item(),
                 "kl": ((kl * mask).sum() / n).item() if kl is not None else 0.0}
    return loss, stats


def microbatch_scale(num_tokens, step_tokens, world_size=1):
    """Factor turning a micro-batch's token mean into its share of the whole step's token mean:
    sum / step_tokens = mean * num_tokens / step_tokens, times world_size because DDP averages
    gradients over ranks. step_tokens counts the masked tokens of the step on all ranks."""
    return num_tokens * world_size / max(step_tokens, 1)


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


# ----------------------------------------------------------------------------------------------------
# Data: rows {question, answer, options, images} from Orz-math pairs or question/answer files

def load_raw_rows(path, split):
    if os.path.isdir(path):
        from datasets import load_from_disk
        ds = load_from_disk(path)
        return list(ds[split] if hasattr(ds, "keys") else ds)
    if os.path.isfile(path):
        if path.endswith(".jsonl"):
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()]
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        if path.endswith(".parquet"):
            from datasets import load_dataset
            return list(load_dataset("parquet", data_files=path, split="train"))
        raise ValueError(f"{path}: unsupported file type (use .json, .jsonl, .parquet or a save_to_disk folder)")
    from datasets import load_dataset  # a hub id, e.g. GBaker/MedQA-USMLE-4-options
    return list(load_dataset(path, split=split))


def normalize_row(raw, i, source):
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
    gold = str(gold)
    if "####" in gold:  # GSM8K's worked answer ends with "#### N"
        gold = gold.split("####")[-1].strip()
    images = raw.get("images") or ([raw["image"]] if raw.get("image") is not None else [])
    base = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else ""
    images = [os.path.join(base, im) if isinstance(im, str) else im for im in images]
    return {"question": question, "answer": gold, "options": options, "images": images}


def open_images(row):
    from PIL import Image
    return [Image.open(im).convert("RGB") if isinstance(im, str) else im.convert("RGB") for im in row["images"]]


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


# ----------------------------------------------------------------------------------------------------
# Trainer side: batches and log-probs

def collate(samples, pad_id, device, placeholders=()):
    """Left-pad prompts and right-pad completions so every completion starts at the same column:
    input_ids [B, P + C], completion_ids / mask / advantages / sampler log-probs [B, C].
    `placeholders`: image/video token ids; one sampled inside a completion is fed as padding
    (the sample's loss_mask excludes it)."""
    P = max(len(s["prompt_ids"]) for s in samples)
    C = max(len(s["completion_ids"]) for s in samples)
    ids, attn, comp, mask, slp = [], [], [], [], []
    for s in samples:
        p, c = s["prompt_ids"], s["completion_ids"]
        c_in = [pad_id if t in placeholders else t for t in c]  # a sampled image placeholder has no image
        ids.append([pad_id] * (P - len(p)) + p + c_in + [pad_id] * (C - len(c)))
        attn.append([0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c)))
        comp.append(c + [pad_id] * (C - len(c)))
        mask.append(s["loss_mask"] + [0] * (C - len(c)))
        slp.append(s["sampler_logprobs"] + [0.0] * (C - len(c)))
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attn), "completion_ids": torch.tensor(comp),
             "mask": torch.tensor(mask, dtype=torch.float32), "sampler_logprobs": torch.tensor(slp),
             "advantages": torch.tensor([s["advantage"] for s in samples], dtype=torch.float32)}
    vision = [s["vision"] for s in samples if s["vision"]]
    if vision:  # images of the rows in order; rows without images contribute none
        batch["pixel_values"] = torch.cat([v["pixel_values"] for v in vision])
        batch["image_grid_thw"] = torch.cat([v["image_grid_thw"] for v in vision])
    for key in ("old_logprobs", "ref_logprobs"):
        if key in samples[0]:
            batch[key] = torch.nn.utils.rnn.pad_sequence([s[key] for s in samples], batch_first=True)
    return {k: v.to(device) for k, v in batch.items()}


def completion_logprobs(model, batch, temperature, with_entropy=False):
    """log pi(token) of each completion token under log_softmax(logits / T), the distribution the sampler
    drew from; [B, C]. Only the completion's logits are computed (logits_to_keep)."""
    C = batch["completion_ids"].shape[1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in batch}
    logits = model(**inputs, logits_to_keep=C + 1, use_cache=False).logits[:, :-1]  # [B, C, V]: t predicts token t
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)  # [B, C]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, C]
    return logp, entropy


def load_model(path, is_vlm, cfg):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    model = (AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32)
    for name, p in model.named_parameters():
        if "visual." in name and (cfg.freeze_merger if "merger" in name else cfg.freeze_vision_tower):
            p.requires_grad_(False)
    return model


def reduce_metrics(accelerator, sums, maxes):
    """Sum `sums` and take the max of `maxes` over ranks (one gather)."""
    keys = list(sums) + list(maxes)
    local = torch.tensor([float(sums[k]) for k in sums] + [float(maxes[k]) for k in maxes], device=accelerator.device)
    allv = accelerator.gather(local.unsqueeze(0)).view(accelerator.num_processes, -1)  # [world, n]
    red = torch.cat([allv[:, :len(sums)].sum(0), allv[:, len(sums):].max(0).values]).tolist()
    return dict(zip(keys, red))


def latest_checkpoint(output_dir):
    steps = [int(m.group(1)) for d in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def save_checkpoint(accelerator, model, processor, step, cfg):
    """Write checkpoint-{step}.tmp, then rename it: a crash never leaves a half-written checkpoint-N."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(os.path.join(tmp, "state"))  # weights, optimizer, scheduler, RNG of every process
    state_dict = accelerator.get_state_dict(model)  # collective (gathers FSDP shards): every rank calls it
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "config": asdict(cfg)}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(int(d.split("-")[1]) for d in os.listdir(cfg.output_dir) if re.fullmatch(r"checkpoint-\d+", d))
        for old in kept[:-cfg.save_total_limit] if cfg.save_total_limit > 0 else []:
            shutil.rmtree(os.path.join(cfg.output_dir, f"checkpoint-{old}"))
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------

def main(cfg: Config):
    if cfg.backend not in ("vllm", "hf"):
        raise ValueError(f"--backend {cfg.backend!r}: use 'vllm' or 'hf'")
    if cfg.temperature <= 0:
        raise ValueError("--temperature must be > 0 for RL (the log-probs are taken after temperature)")
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=True)  # VLMs: the merger sits idle on text
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # without cpu=True, torchrun on CPUs gives 1-process runs
                              mixed_precision="bf16" if cfg.bf16 and torch.cuda.is_available() else "no",
                              kwargs_handlers=[ddp_kwargs])
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the {world} processes")
    per_rank, G = cfg.prompts_per_step // world, cfg.num_generations
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)

    # ---- data: filter over-long prompts (a prompt with image tokens must never be cut) ----
    processor, tokenizer = generation.load_processor(cfg.model_name_or_path)
    is_vlm = hasattr(processor, "image_processor")
    raw = load_raw_rows(cfg.dataset, cfg.dataset_split)
    rows, num_filtered = [], 0
    for i, r in enumerate(raw):
        row = normalize_row(r, i, cfg.dataset)
        row["prompt"] = build_prompt(processor, row, cfg.prompt_template)
        n = len(encode_prompt(processor, tokenizer, row["prompt"], open_images(row))[0]) if row["images"] else \
            len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        if n > cfg.max_prompt_length:
            num_filtered += 1
        else:
            rows.append(row)
    if len(rows) < cfg.prompts_per_step:
        raise ValueError(f"{cfg.dataset}: {len(rows)} usable prompts ({num_filtered} longer than --max_prompt_length "
                         f"{cfg.max_prompt_length}) < --prompts_per_step {cfg.prompts_per_step}")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * (len(rows) // cfg.prompts_per_step)
    total_updates = total_steps * cfg.num_iterations

    # ---- model, reference, optimizer; resume weights, optimizer, scheduler and RNG (as sft.py) ----
    model = load_model(cfg.model_name_or_path, is_vlm, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if cfg.beta > 0:  # frozen copy of the *starting* policy, also when resuming
        ref_model = load_model(cfg.model_name_or_path, is_vlm, cfg).to(accelerator.device).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    warmup = int(cfg.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # not accelerator.prepare'd: that would step it once per rank
        optimizer, lambda u: lr_factor(u, warmup, total_updates, cfg.lr_scheduler))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    policy = accelerator.unwrap_model(model)
    placeholders = {getattr(policy.config, k, None) for k in ("image_token_id", "video_token_id")} - {None}
    resume_dir = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    start_step = 0
    if resume_dir:
        accelerator.load_state(os.path.join(resume_dir, "state"))
        with open(os.path.join(resume_dir, "trainer_state.json")) as f:
            start_step = json.load(f)["step"]
    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    if main_proc:  # keep the log consistent with the checkpoint we continue from
        old = open(log_path).read().splitlines() if os.path.exists(log_path) else []
        with open(log_path, "w") as f:
            f.writelines(line + "\n" for line in old if start_step and json.loads(line)["step"] <= start_step)
    if main_proc:
        print(f"rl.py: {len(rows)} prompts ({num_filtered} over {cfg.max_prompt_length} tokens dropped), "
              f"{total_steps} steps of {cfg.prompts_per_step} prompts x {G} completions on {world} process(es), "
              f"backend {cfg.backend}" + (f", resuming at step {start_step} from {resume_dir}" if resume_dir else ""))

    # ---- generation engine ----
    if cfg.backend == "hf":  # the policy generates itself: weight sync is free
        engine = generation.load_engine(cfg.model_name_or_path, "hf", model=policy, processor=processor, seed=cfg.seed)
    else:
        engine = generation.load_engine(
            cfg.model_name_or_path, "vllm", processor=processor, tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed,  # + rank inside
            max_model_len=cfg.max_prompt_length + cfg.max_response_length, dtype=cfg.vllm_dtype,
            enable_sleep_mode=cfg.vllm_sleep and torch.cuda.is_available(),
            kv_cache_memory_bytes=cfg.vllm_kv_cache_memory_bytes)
        if resume_dir:
            generation.sync_weights(engine, model, accelerator)  # gathers FSDP shards

    def rollout(indices, seed):
        """Sample G completions for each row and score them: one dict per group."""
        groups = [{"row": rows[i], "images": open_images(rows[i])} for i in indices]
        policy.eval()
        t0 = time.time()
        outs = generation.generate(
            engine, [{"prompt": g["row"]["prompt"], "images": g["images"]} for g in groups], n=G,
            temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_response_length,
            think_budget=cfg.think_budget, return_logprobs=True, seed=seed, batch_size=cfg.generation_batch_size)
        t1 = time.time()
        for g, comps in zip(groups, outs):
            g["completions"] = comps
            opts = [g["row"]["options"]] * G if g["row"]["options"] else None
            g["rewards"] = rewards.accuracy_reward([c.text for c in comps], [g["row"]["answer"]] * G, opts)
        policy.train()
        return groups, t1 - t0, time.time() - t1

    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not main_proc, desc="rl")
    for step in bar:
        t_step = time.time()
        # every rank must gather the same keys in the same order: all of them start here
        sums = dict.fromkeys(["groups", "zero_var_groups", "skipped_groups", "refill_groups", "completions", "scored",
                              "reward_sum", "reward_sq_sum", "correct", "response_tokens", "truncated", "forced_exits"], 0.0)
        maxes = {"response_length_max": 0}

        # ==== 1. generate: whole groups for this rank's share of the step's prompts ====
        indices = step_prompt_indices(step, len(rows), cfg.prompts_per_step, cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
        groups, t_gen, t_score = rollout(indices, seed=cfg.seed + (step * world + rank) * 1000)

        # ==== 2. rewards: None = unparseable gold -> that group is skipped (no loss) and counted ====
        def usable(g):
            return all(r is not None for r in g["rewards"])

        def zero_var(g):
            return usable(g) and len(set(g["rewards"])) == 1

        sums.update(groups=len(groups), zero_var_groups=sum(map(zero_var, groups)),
                    skipped_groups=sum(not usable(g) for g in groups))
        if cfg.dynamic_sampling:  # DAPO: keep only groups with a learning signal, refill from random prompts
            rng = random.Random(cfg.seed * 100003 + step * world + rank)
            keep, rest = [g for g in groups if usable(g) and not zero_var(g)], [g for g in groups if usable(g) and zero_var(g)]
            for rnd in range(cfg.dynamic_sampling_max_rounds):
                if len(keep) >= per_rank:
                    break
                new, tg, ts = rollout(rng.sample(range(len(rows)), per_rank - len(keep)),
                                      seed=cfg.seed + (step * world + rank) * 1000 + rnd + 1)
                t_gen, t_score, sums["refill_groups"] = t_gen + tg, t_score + ts, sums["refill_groups"] + len(new)
                keep += [g for g in new if usable(g) and not zero_var(g)]
            groups = (keep + rest + [g for g in groups if not usable(g)])[:per_rank]  # same count on every rank
        if cfg.backend == "vllm":
            generation.sleep(engine)  # hand vLLM's GPU memory to the trainer

        # ==== 3. advantages, per group (groups never span ranks) ====
        t0 = time.time()
        flat_rewards = [r if usable(g) else 0.0 for g in groups for r in g["rewards"]]
        advantages = group_advantages(flat_rewards, G, cfg.scale_rewards).tolist()
        samples = []
        for gi, g in enumerate(groups):
            prompt_ids, vision = encode_prompt(processor, tokenizer, g["row"]["prompt"], g["images"])
            for j, c in enumerate(g["completions"]):
                truncated = c.finish_reason == "length"
                train_on = usable(g) and not (truncated and cfg.mask_truncated_completions)
                samples.append({
                    "prompt_ids": prompt_ids, "vision": vision, "completion_ids": list(c.token_ids) or [tokenizer.pad_token_id],
                    # forced `</think>` tokens were not sampled: context, but no loss
                    "loss_mask": [int(train_on and not f and t not in placeholders)
                                  for t, f in zip(c.token_ids, c.forced_mask or [0] * len(c.token_ids))] or [0],
                    "sampler_logprobs": list(c.logprobs or [0.0] * len(c.token_ids)) or [0.0],
                    "advantage": advantages[gi * G + j]})
                r = g["rewards"][j] if usable(g) else None
                sums["completions"] += 1
                sums["scored"] += r is not None
                sums["reward_sum"] += r or 0.0
                sums["reward_sq_sum"] += (r or 0.0) ** 2
                sums["correct"] += r == 1.0
                sums["response_tokens"] += len(c.token_ids)
                sums["truncated"] += truncated
                sums["forced_exits"] += c.forced_exit
                maxes["response_length_max"] = max(maxes["response_length_max"], len(c.token_ids))
        # the step's token-level mean runs over every masked token on every rank
        step_tokens = reduce_metrics(accelerator, {"t": sum(sum(s["loss_mask"]) for s in samples)}, {})["t"]
        microbatches = [samples[i:i + cfg.micro_batch_size] for i in range(0, len(samples), cfg.micro_batch_size)]

        # ==== 4. log-probs: the old policy (before the update; only needed for several updates) and the reference ====
        if cfg.num_iterations > 1 or ref_model is not None:
            with torch.no_grad():
                for mb in microbatches:
                    batch = collate(mb, tokenizer.pad_token_id, accelerator.device, placeholders)
                    if cfg.num_iterations > 1:
                        old = completion_logprobs(model, batch, cfg.temperature)[0]
                    if ref_model is not None:
                        ref = completion_logprobs(ref_model, batch, cfg.temperature)[0]
                    for k, s in enumerate(mb):
                        n = len(s["completion_ids"])
                        if cfg.num_iterations > 1:
                            s["old_logprobs"] = old[k, :n].cpu()
                        if ref_model is not None:
                            s["ref_logprobs"] = ref[k, :n].cpu()

        # ==== 5. update: clipped, token-level policy gradient over the whole step ====
        train = {"tok": 0.0, "clip": 0.0, "kl": 0.0, "entropy": 0.0, "gap": 0.0, "tis_clipped": 0.0}
        gap_max, grad_norm, lr = 0.0, 0.0, scheduler.get_last_lr()[0]
        for it in range(cfg.num_iterations):
            for k, mb in enumerate(microbatches):
                batch = collate(mb, tokenizer.pad_token_id, accelerator.device, placeholders)
                sync = k == len(microbatches) - 1  # DDP all-reduces once, on the last micro-batch
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    logp, entropy = completion_logprobs(model, batch, cfg.temperature, with_entropy=it == 0)
                    old = batch.get("old_logprobs", logp.detach())  # on-policy: ratio = 1, gradient = A * grad log pi
                    adv, mask = batch["advantages"].unsqueeze(-1), batch["mask"]
                    if cfg.tis_cap > 0:  # A * w is the same as weighting the token's clipped term by w > 0
                        w = tis_weights(old, batch["sampler_logprobs"], cfg.tis_cap)
                        adv = adv * w
                        train["tis_clipped"] += ((w >= cfg.tis_cap) * mask).sum().item() if it == 0 else 0
                    loss, stats = policy_loss(logp, old, adv, mask, cfg.eps_low, cfg.eps_high,
                                              batch.get("ref_logprobs"), cfg.beta)
                    n_tok = mask.sum().item()
                    accelerator.backward(loss * microbatch_scale(n_tok, step_tokens, world))
                if it == 0:  # diagnostics of the batch as sampled
                    gap = (logp.detach() - batch["sampler_logprobs"]).abs() * mask
                    train["tok"] += n_tok
                    train["gap"] += gap.sum().item()
                    gap_max = max(gap_max, gap.max().item())
                    train["entropy"] += (entropy * mask).sum().item()
                    train["kl"] += stats["kl"] * n_tok
                train["clip"] += stats["clip_fraction"] * n_tok / cfg.num_iterations
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm).item()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        t_train = time.time() - t0

        # ==== 6. update the inference engine (vLLM: push the weights; hf: it is the policy) ====
        t0 = time.time()
        if cfg.backend == "vllm":
            generation.wake_up(engine)
            generation.sync_weights(engine, model, accelerator)  # gathers FSDP shards
        t_sync = time.time() - t0

        # ==== 7. log: metrics gathered over ranks ====
        sums.update({f"train_{k}": v for k, v in train.items()})
        maxes.update(logprob_gap_max=gap_max, t_gen=t_gen, t_score=t_score, t_train=t_train, t_sync=t_sync)
        m = reduce_metrics(accelerator, sums, maxes)
        scored, tok = max(m["scored"], 1), max(m["train_tok"], 1)
        mean = m["reward_sum"] / scored
        log = {"step": step + 1, "reward_mean": mean,
               "reward_std": math.sqrt(max(m["reward_sq_sum"] / scored - mean ** 2, 0.0)),
               "accuracy": m["correct"] / scored, "zero_var_group_frac": m["zero_var_groups"] / m["groups"],
               "skipped_groups": int(m["skipped_groups"]), "refill_groups": int(m["refill_groups"]),
               "response_length_mean": m["response_tokens"] / m["completions"],
               "response_length_max": int(m["response_length_max"]), "truncation_rate": m["truncated"] / m["completions"],
               "forced_exit_rate": m["forced_exits"] / m["completions"], "clip_fraction": m["train_clip"] / tok,
               "kl": m["train_kl"] / tok, "entropy": m["train_entropy"] / tok, "grad_norm": grad_norm,
               "logprob_gap_mean": m["train_gap"] / tok, "logprob_gap_max": m["logprob_gap_max"],
               "tis_clipped_frac": m["train_tis_clipped"] / tok, "lr": lr,
               "train_tokens": int(m["train_tok"]), "filtered_prompts": num_filtered,
               "gen_tokens_per_s": m["response_tokens"] / max(m["t_gen"], 1e-9),
               "train_tokens_per_s": m["response_tokens"] * cfg.num_iterations / max(m["t_train"], 1e-9),
               "time_generate": m["t_gen"], "time_score": m["t_score"], "time_train": m["t_train"],
               "time_sync": m["t_sync"], "time_step": time.time() - t_step}
        if main_proc:
            with open(log_path, "a") as f:
                f.write(json.dumps(log) + "\n")
            g = groups[0]  # one sample per step, to read what the policy writes
            with open(os.path.join(cfg.output_dir, "completions.jsonl"), "a") as f:
                f.write(json.dumps({"step": step + 1, "prompt": g["row"]["prompt"], "gold": g["row"]["answer"],
                                    "completion": g["completions"][0].text, "reward": g["rewards"][0]}) + "\n")
            bar.set_postfix(reward=f"{log['reward_mean']:.3f}", len=f"{log['response_length_mean']:.0f}",
                            kl=f"{log['kl']:.4f}", clip=f"{log['clip_fraction']:.3f}")

        # ==== 8. save ====
        if cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0 and step + 1 < total_steps:
            save_checkpoint(accelerator, model, processor, step + 1, cfg)

    save_checkpoint(accelerator, model, processor, total_steps, cfg)
    state_dict = accelerator.get_state_dict(model)
    if main_proc:
        policy.save_pretrained(cfg.output_dir, state_dict=state_dict)
        processor.save_pretrained(cfg.output_dir)
        print(f"rl.py: saved the policy to {cfg.output_dir}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(HfArgumentParser(Config).parse_args_into_dataclasses()[0])
