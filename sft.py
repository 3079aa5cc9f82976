r"""Stage 1 of X-Reasoner: supervised fine-tuning of a vision-language model on text-only long CoT.

    # a laptop: a tiny random VLM and toy data (python scripts/make_tiny_model.py --output_dir tiny-vl;
    # python scripts/make_toy_data.py --output_dir toy)
    python sft.py --model_name_or_path tiny-vl --dataset toy/sft/openthoughts.jsonl \
        --output_dir runs/sft-toy --max_steps 50 --per_device_batch_size 8 --learning_rate 1e-3
    # the paper, one node of 8 GPUs (FSDP2; --gradient_accumulation_steps 4 keeps the global batch 128)
    accelerate launch --config_file configs/8gpu.yaml sft.py --output_dir runs/sft \
        --gradient_accumulation_steps 4

The paper: Qwen2.5-VL-7B-Instruct, OpenThoughts-114k (DeepSeek-R1 chains of thought, text only), vision
encoder frozen, AdamW lr 1e-5, no weight decay, 4 epochs, lr x0.8 per epoch, 4 examples per GPU on 32
GPUs, examples truncated to 4096 tokens.

Several processes (torchrun or `accelerate launch`) shard the model with FSDP2: one unit per decoder
layer, parameters gathered in bf16, gradients reduced in fp32 into fp32 shards, no unsharded gradient
copies. The loss never builds [tokens, vocab] logits (common.token_logprobs: 512-token chunks).

Data: a hub id or a local file/folder (JSONL, JSON, Parquet, CSV, or a `save_to_disk` folder), in one of
two shapes. OpenThoughts (`system`, `conversations`): the user turn becomes `rewards.train_prompt(question)`
and the assistant's <|begin_of_thought|>/<|begin_of_solution|> sections become
`rewards.format_response(thinking, solution)`. Chat (`messages` = [{role, content}], optional `images`:
paths relative to the data file, or PIL images); a content may be a list with {"type": "image"} items,
otherwise the images go before the text of the first user turn.

The loss is the mean over every supervised (assistant) token of the global step, whatever the split into
micro-batches and processes. Examples are packed into rows with per-example position ids; transformers
turns position-id resets into a block-diagonal attention mask (sdpa/eager) or varlen kernels (flash
attention), so packed examples never see each other. Qwen2.5-VL gets 4-row position ids: the text
positions (used to find the example boundaries) and the three M-RoPE rows.

Writes `output_dir/log.jsonl` (one line per step), `output_dir/checkpoint-N/` (the model in bf16,
`from_pretrained`-loadable, and in `state/` the sharded fp32 weights, optimizer and RNG to resume from),
and the final model in `output_dir`.
"""

import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

import common
import rewards


@dataclass
class Config:
    # model and data
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-7B-Instruct",
        metadata={"help": "hub id or folder; VLMs load with AutoModelForImageTextToText, text "
                          "models with AutoModelForCausalLM (paper: Qwen2.5-VL-7B-Instruct)"},
    )
    dataset: str = field(
        default="open-thoughts/OpenThoughts-114k",
        metadata={"help": "hub id, or a local .jsonl/.json/.parquet/.csv file or save_to_disk "
                          "folder (paper: OpenThoughts-114k)"},
    )
    dataset_config: str = field(
        default="",
        metadata={"help": "hub dataset config name, if any"},
    )
    dataset_split: str = field(
        default="train",
        metadata={"help": "split to train on"},
    )
    limit: int = field(
        default=0,
        metadata={"help": "use only the first N rows (0 = all)"},
    )
    keep_system_prompt: bool = field(
        default=False,
        metadata={"help": "keep the dataset's own system prompt (paper: dropped; its format has "
                          "none)"},
    )
    on_bad_row: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "a malformed row: stop, naming file, row and field; or drop it and "
                          "count it"},
    )
    assistant_header: str = field(
        default="<|im_start|>assistant\n",
        metadata={"help": "text that opens an assistant turn in the chat template (Qwen's)"},
    )
    end_of_turn: str = field(
        default="<|im_end|>",
        metadata={"help": "token that ends a turn; supervised, so the model learns to stop"},
    )
    output_dir: str = field(
        default="runs/sft",
        metadata={"help": "checkpoints, log.jsonl and the final model"},
    )
    # sequence length and batching
    max_length: int = field(
        default=4096,
        metadata={"help": "longest example in tokens (paper: 4096)"},
    )
    overlong: Literal["truncate", "drop"] = field(
        default="truncate",
        metadata={"help": "longer examples are truncated (paper) or dropped; an example whose cut "
                          "would split an image is dropped; both counted"},
    )
    packing: bool = field(
        default=True,
        metadata={"help": "pack each micro-batch's examples into as few rows as fit pack_length "
                          "(attention kept per example); off = one padded row per example"},
    )
    pack_length: int = field(
        default=0,
        metadata={"help": "row length for packing; 0 = the micro-batch's longest example, so rows "
                          "are never longer than padded ones (with flash attention, max_length "
                          "packs tightest)"},
    )
    per_device_batch_size: int = field(
        default=4,
        metadata={"help": "examples per process per micro-batch (paper: 4)"},
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "micro-batches per optimizer step; global batch = processes x this x "
                          "per_device_batch_size (paper: 32 x 1 x 4 = 128)"},
    )
    # optimisation
    num_epochs: int = field(
        default=4,
        metadata={"help": "passes over the data (paper: 4)"},
    )
    max_steps: int = field(
        default=0,
        metadata={"help": "optimizer steps; overrides num_epochs when > 0"},
    )
    learning_rate: float = field(
        default=1e-5,
        metadata={"help": "peak learning rate (paper: 1e-5)"},
    )
    lr_scheduler: Literal["epoch_decay", "cosine", "linear"] = field(
        default="epoch_decay",
        metadata={"help": "epoch_decay: lr x lr_decay after each epoch, stepwise (paper); cosine "
                          "or linear: to 0 after warm-up"},
    )
    lr_decay: float = field(
        default=0.8,
        metadata={"help": "multiplicative decay per epoch for epoch_decay (paper: 0.8)"},
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "fraction of steps with linear warm-up (paper: none stated)"},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW weight decay (paper: 0.0)"},
    )
    adam_beta1: float = field(
        default=0.9,
        metadata={"help": "AdamW beta1 (paper: 0.9)"},
    )
    adam_beta2: float = field(
        default=0.999,
        metadata={"help": "AdamW beta2 (paper: 0.999)"},
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "clip the global grad norm (paper: not stated; 1.0 is the common "
                          "default; 0 = off)"},
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "freeze the vision tower (paper: frozen vision encoder)"},
    )
    freeze_projector: bool = field(
        default=False,
        metadata={"help": "also freeze the vision-to-language projector (Qwen's merger; paper: not "
                          "stated)"},
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "recompute activations in backward (needed for 7B at 4096 tokens)"},
    )
    bf16: bool = field(
        default=True,
        metadata={"help": "GPUs: compute in bf16, fp32 master weights and gradient reduction (lr "
                          "1e-5 updates vanish in bf16 weights); the CPU always runs fp32"},
    )
    logprob_chunk_size: int = field(
        default=512,
        metadata={"help": "tokens per LM-head chunk in the loss: memory only, the math is "
                          "unchanged"},
    )
    attn_implementation: Literal["sdpa_packed", "sdpa", "eager", "flash_attention_2"] = field(
        default="sdpa_packed",
        metadata={"help": "attention kernel. sdpa_packed: sdpa once per packed sequence (no [W, W] "
                          "mask); flash_attention_2: GPUs with flash-attn installed"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "data order and initialisation seed"},
    )
    # checkpoints and logging
    save_steps: int = field(
        default=500,
        metadata={"help": "save a checkpoint every N steps (and always at the end; 0 = only at "
                          "the end)"},
    )
    save_total_limit: int = field(
        default=2,
        metadata={"help": "keep only the newest N checkpoints (0 = keep all)"},
    )
    save_dtype: Literal["bfloat16", "float32"] = field(
        default="bfloat16",
        metadata={"help": "dtype of the saved models (the resume state is always fp32)"},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue from the newest checkpoint in output_dir (weights, optimizer, "
                          "RNG, data position)"},
    )
    report_to: Literal["none", "wandb", "tensorboard"] = field(
        default="none",
        metadata={"help": "also report to wandb or tensorboard (log.jsonl is always written)"},
    )


# ----------------------------------------------------------------------------------------------------------------
# Data: rows -> conversations
# ----------------------------------------------------------------------------------------------------------------
class BadRow(ValueError):
    pass


THOUGHT_RE = re.compile(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>", re.S)
SOLUTION_RE = re.compile(r"<\|begin_of_solution\|>(.*?)<\|end_of_solution\|>", re.S)
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def openthoughts_to_messages(row: dict, keep_system_prompt: bool) -> list[dict]:
    """OpenThoughts-114k row -> chat messages in the paper's prompt and answer format."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise BadRow("field `conversations`: expected a non-empty list of {from, value}")
    messages = []
    if keep_system_prompt and row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    for k, turn in enumerate(turns):
        role = ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise BadRow(f"field `conversations[{k}]`: expected {{from: user|assistant, value: str}}, got {str(turn)[:80]!r}")
        if role == "user":
            messages.append({"role": "user", "content": rewards.train_prompt(value.strip())})
        elif role == "assistant":
            thought, solution = THOUGHT_RE.search(value), SOLUTION_RE.search(value)
            if thought is None or solution is None:
                raise BadRow(f"field `conversations[{k}].value`: no <|begin_of_thought|>...<|end_of_thought|> "
                             "and <|begin_of_solution|>...<|end_of_solution|> sections")
            messages.append({"role": "assistant",
                             "content": rewards.format_response(thought.group(1).strip(), solution.group(1).strip())})
        elif keep_system_prompt:
            messages.append({"role": "system", "content": value})
    return messages


def chat_to_messages(row: dict, base_dir: str) -> tuple[list[dict], list]:
    """`messages` row (+ optional `images`) -> (messages with {"type": "image"} items, images)."""
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRow("field `messages`: expected a non-empty list of {role, content}")
    images = row.get("images") or []
    if not isinstance(images, list):
        images = [images]
    images = [os.path.join(base_dir, im) if isinstance(im, str) and not os.path.isabs(im) else im for im in images]
    placeholders = 0
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), (str, list)):
            raise BadRow(f"field `messages[{k}]`: expected {{role: system|user|assistant, content: str or list}}")
        if isinstance(m["content"], list):
            placeholders += sum(isinstance(c, dict) and c.get("type") == "image" for c in m["content"])
    if images and placeholders == 0:  # images go before the text of the first user turn
        k = next((k for k, m in enumerate(messages) if m["role"] == "user"), None)
        if k is None:
            raise BadRow("field `messages`: has images but no user turn to put them in")
        text = messages[k]["content"]
        content = [{"type": "text", "text": text}] if isinstance(text, str) else list(text)
        messages = [*messages[:k], {"role": "user", "content": [{"type": "image"}] * len(images) + content}, *messages[k + 1:]]
    elif placeholders != len(images):
        raise BadRow(f"field `images`: {len(images)} images but {placeholders} {{\"type\": \"image\"}} items in `messages`")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("field `messages`: no assistant turn to learn from")
    return messages, images


def row_to_conversation(row: dict, base_dir: str, keep_system_prompt: bool) -> tuple[list[dict], list]:
    if not isinstance(row, dict):
        raise BadRow(f"expected an object, got {type(row).__name__}")
    if "conversations" in row:
        return openthoughts_to_messages(row, keep_system_prompt), []
    if "messages" in row:
        return chat_to_messages(row, base_dir)
    raise BadRow(f"no `conversations` (OpenThoughts) or `messages` (chat) field; fields: {sorted(row)}")


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation: supervise the assistant turns only
# ----------------------------------------------------------------------------------------------------------------
def assistant_token_mask(ids: list[int], header: list[int], end_id: int) -> list[int]:
    """1 on every token of every assistant turn (after `header`, up to and including `end_id`), else 0."""
    mask, n, i = [0] * len(ids), len(header), 0
    while i <= len(ids) - n:
        if ids[i:i + n] != header:
            i += 1
            continue
        j = i + n
        while j < len(ids) and ids[j] != end_id:
            mask[j] = 1
            j += 1
        if j < len(ids):
            mask[j] = 1  # the end-of-turn token: the model must learn to stop
        i = j + 1
    return mask


def next_token_targets(ids: list[int], mask: list[int]) -> list[int]:
    """targets[t] = ids[t + 1] where that token is supervised, else -100. Shifted per example, so packing
    several examples in a row never asks one example to predict the next one's first token."""
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


def tokenize_example(messages, images, processor, tokenizer, header, end_id, rope_index=None):
    """-> dict(ids, targets, images, positions: [3, L] M-RoPE ids for image examples, else None)."""
    text = processor.apply_chat_template(messages, tokenize=False)
    if images:
        enc = processor(text=[text], images=[common.open_image(im) for im in images], return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        positions = rope_index(enc["input_ids"], enc["image_grid_thw"]) if rope_index else None  # [3, L]
    else:
        ids, positions = tokenizer(text, add_special_tokens=False)["input_ids"], None
    mask = assistant_token_mask(ids, header, end_id)
    return {"ids": ids, "targets": next_token_targets(ids, mask), "images": images, "positions": positions}


# ----------------------------------------------------------------------------------------------------------------
# Batching: pack examples into rows with per-example position ids
# ----------------------------------------------------------------------------------------------------------------
def collate(examples: list[dict], rows: list[list[int]], pad_id: int, mrope: bool) -> dict:
    """Rows of examples -> model inputs. Padding fills each row's tail and continues its last example's
    positions (targets -100): causal attention never lets a real token see it, and a row of one example
    stays one sequence (one causal attention call, no mask)."""
    width = max(sum(len(examples[i]["ids"]) for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)
    targets = torch.full((R, width), -100, dtype=torch.long)
    text_pos = torch.zeros((R, width), dtype=torch.long)
    rope_pos = torch.zeros((3, R, width), dtype=torch.long)
    images, real = [], 0
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            ex, n = examples[i], len(examples[i]["ids"])
            input_ids[r, t:t + n] = torch.as_tensor(ex["ids"])
            targets[r, t:t + n] = torch.as_tensor(ex["targets"])
            text_pos[r, t:t + n] = torch.arange(n)
            rope_pos[:, r, t:t + n] = ex["positions"] if ex["positions"] is not None else torch.arange(n)
            images += ex["images"]  # row-major order = the order of image tokens in the flattened batch
            t += n
        real += t
        text_pos[r, t:] = torch.arange(n, n + width - t)
        rope_pos[:, r, t:] = torch.arange(n, n + width - t)
    batch = {"input_ids": input_ids, "targets": targets, "images": images,
             "padding_fraction": 1 - real / (R * width), "tokens": real}
    # Qwen2.5-VL: [4, R, width] = text positions (mark the example boundaries) + the three M-RoPE rows
    batch["position_ids"] = torch.cat([text_pos[None], rope_pos]) if mrope else text_pos
    return batch


def token_loss_sum(model: common.LogProbModel, batch: dict, pixel_inputs: dict) -> torch.Tensor:
    """Sum of cross-entropies over the supervised tokens: -sum log p(target). The LM head runs only on
    supervised positions, 512 at a time (no [rows, width, vocab] logits)."""
    logp, _ = model(targets=batch["targets"], input_ids=batch["input_ids"],
                    position_ids=batch["position_ids"], attention_mask=None, **pixel_inputs)  # [R, W]
    return -logp.sum()


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: Config) -> float:
    """Learning rate at optimizer step `step` (0-based)."""
    warmup = int(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.lr_scheduler == "epoch_decay":  # the paper: x0.8 after every epoch, stepwise
        return cfg.learning_rate * cfg.lr_decay ** (step // steps_per_epoch)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.lr_scheduler == "cosine":
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * (1 - progress)  # linear


def global_batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """The examples of optimizer step `step`: a seeded shuffle per epoch, the incomplete tail dropped."""
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[k * global_batch:(k + 1) * global_batch]


def main(cfg: Config):
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    # ------------------------------------------------------------------------------------------------
    # 1. Set-up: processes, model (sharded with FSDP2 over several processes), frozen parts
    # ------------------------------------------------------------------------------------------------
    rank, world, device = common.init_distributed()
    main_proc = rank == 0
    torch.manual_seed(cfg.seed)
    resume_dir = common.resume_dir(cfg.output_dir, cfg.resume)  # refuses an earlier run's folder
    if cfg.resume and resume_dir is None:
        common.print0(f"--resume: no checkpoint in {cfg.output_dir}, starting from the beginning")
    if main_proc:
        os.makedirs(cfg.output_dir, exist_ok=True)
    model_config = AutoConfig.from_pretrained(cfg.model_name_or_path)
    is_vlm = hasattr(model_config, "vision_config")
    bf16 = cfg.bf16 and device.type == "cuda"
    model = common.load_model(cfg.model_name_or_path, device, world, torch.float32, cfg.attn_implementation)
    processor = (AutoProcessor if is_vlm else AutoTokenizer).from_pretrained(cfg.model_name_or_path)
    tokenizer = getattr(processor, "tokenizer", processor)
    model.config.use_cache = False
    n_all = sum(p.numel() for p in model.parameters())
    n_train = common.freeze_vision(model, cfg.freeze_vision_tower, cfg.freeze_projector)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------------------------------------
    # 2. Data: rows -> conversations -> token ids and next-token targets (assistant turns only)
    # ------------------------------------------------------------------------------------------------
    rows, base_dir = common.load_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config)
    n_rows = min(len(rows), cfg.limit) if cfg.limit > 0 else len(rows)
    header = tokenizer.encode(cfg.assistant_header, add_special_tokens=False)
    end_id = tokenizer.convert_tokens_to_ids(cfg.end_of_turn)
    image_token_id = getattr(model_config, "image_token_id", None)
    rope_index = common.make_rope_index(model, image_token_id) if is_vlm else None
    counts = {"rows": n_rows, "bad_rows": 0, "truncated": 0, "dropped_overlong": 0,
              "dropped_image_cut": 0, "dropped_no_target": 0, "images": 0}
    examples = []
    for i in tqdm(range(n_rows), desc="tokenising", disable=not main_proc):
        where = f"{cfg.dataset} row {i}" + (f" (line {i + 1})" if cfg.dataset.endswith(".jsonl") else "")
        try:
            messages, images = row_to_conversation(rows[i], base_dir, cfg.keep_system_prompt)
            if images and not is_vlm:
                raise BadRow(f"field `images`: {cfg.model_name_or_path} is a text-only model")
            ex = tokenize_example(messages, images, processor, tokenizer, header, end_id, rope_index)
        except (BadRow, OSError) as e:
            if cfg.on_bad_row != "skip":
                raise ValueError(f"{where}: {e}") from None
            counts["bad_rows"] += 1
            continue
        truncated = len(ex["ids"]) > cfg.max_length
        if truncated:
            if cfg.overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            if image_token_id is not None and image_token_id in ex["ids"][cfg.max_length:]:
                counts["dropped_image_cut"] += 1  # never cut through an image's tokens
                continue
            ex["ids"] = ex["ids"][:cfg.max_length]
            ex["targets"] = ex["targets"][:cfg.max_length - 1] + [-100]
            ex["positions"] = None if ex["positions"] is None else ex["positions"][:, :cfg.max_length]
        ex["n_targets"] = sum(t != -100 for t in ex["targets"])
        if ex["n_targets"] == 0:
            counts["dropped_no_target"] += 1  # e.g. the prompt alone is longer than max_length
            continue
        counts["truncated"] += truncated
        counts["images"] += len(images)  # in the examples kept (text-only data: 0, and the log says so)
        # int32 tensors: Python int lists take ~9x the memory (114k x 4096 tokens x 2 per process)
        ex["ids"] = torch.tensor(ex["ids"], dtype=torch.int32)
        ex["targets"] = torch.tensor(ex["targets"], dtype=torch.int32)
        examples.append(ex)
    global_batch = world * cfg.gradient_accumulation_steps * cfg.per_device_batch_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.dataset}: {len(examples)} usable examples ({json.dumps(counts)}), "
                         f"fewer than one global batch of {global_batch}")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * steps_per_epoch
    common.print0(f"model {cfg.model_name_or_path}: {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M "
                  f"trained | data {json.dumps(counts)}, {len(examples)} examples | {total_steps} steps, "
                  f"{steps_per_epoch} per epoch, global batch {global_batch} examples on {world} "
                  f"process(es)" + (" (FSDP2)" if world > 1 else ""))

    # ------------------------------------------------------------------------------------------------
    # 3. Shard, optimizer; resume weights, optimizer and RNG
    # ------------------------------------------------------------------------------------------------
    has_images = any(ex["images"] for ex in examples)  # (then every rank touches the projector: FSDP2)
    model = common.shard_model(common.LogProbModel(model, cfg.logprob_chunk_size, has_images),
                               device, world, bf16)
    params = [p for p in model.parameters() if p.requires_grad]  # the sharded ones: taken after sharding
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    start_step = 0
    if resume_dir is not None:
        start_step = common.load_training_state(resume_dir, model, optimizer)["step"]
        common.print0(f"resumed from {resume_dir} at step {start_step}")
    if main_proc:  # keep the log consistent with the checkpoint we continue from
        common.truncate_log(os.path.join(cfg.output_dir, "log.jsonl"), start_step)
    tracker = common.Tracker(cfg.output_dir, cfg.report_to, "x-reasoner-sft", asdict(cfg), main_proc)
    save_dtype = getattr(torch, cfg.save_dtype)
    amp = torch.autocast("cuda", torch.bfloat16) if bf16 and world == 1 else nullcontext()  # FSDP2 casts

    # ------------------------------------------------------------------------------------------------
    # 4. Training loop
    # ------------------------------------------------------------------------------------------------
    model.train()
    b = cfg.per_device_batch_size
    image_processor = getattr(processor, "image_processor", None)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="sft",
               disable=not main_proc)
    for step in bar:
        t0 = time.time()
        lr = lr_at(step, total_steps, steps_per_epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = global_batch_indices(step, len(examples), global_batch, cfg.seed)
        # the loss is sum(token losses) / (supervised tokens of the whole global step); every process
        # knows the global count, and the factor world undoes the gradient mean over processes
        n_tokens = sum(examples[i]["n_targets"] for i in idx)
        loss_sum, tokens, pad_slots, slots = 0.0, 0, 0.0, 0

        # 4a. forward/backward over this process's micro-batches; gradients accumulate in fp32 shards
        for m in range(cfg.gradient_accumulation_steps):
            mine = [examples[i] for i in idx[(m * world + rank) * b:(m * world + rank + 1) * b]]
            lengths = [len(ex["ids"]) for ex in mine]
            rows = common.pack_rows(lengths, max(cfg.pack_length, *lengths)) if cfg.packing \
                else [[i] for i in range(len(mine))]
            batch = collate(mine, rows, tokenizer.pad_token_id, mrope=rope_index is not None)
            pixel_inputs = {}
            if batch["images"]:
                pixel_inputs = dict(image_processor(images=[common.open_image(im) for im in batch["images"]],
                                                    return_tensors="pt"))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pixel_inputs = {k: v.to(device) for k, v in pixel_inputs.items()}
            with amp:
                micro_sum = token_loss_sum(model, batch, pixel_inputs)
            (micro_sum / n_tokens * world).backward()
            loss_sum += micro_sum.item()
            tokens += batch["tokens"]
            width = batch["input_ids"].shape[1] * batch["input_ids"].shape[0]
            slots, pad_slots = slots + width, pad_slots + batch["padding_fraction"] * width
        grad_norm = common.grad_norm_and_clip(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 4b. log: global token-mean loss, lr, grad norm, throughput, padding
        loss_sum, tokens, pad_slots, slots = common.all_reduce([loss_sum, tokens, pad_slots, slots])
        elapsed = time.time() - t0
        record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                  "loss": loss_sum / n_tokens, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / elapsed, "padding_fraction": pad_slots / slots,
                  "supervised_tokens": n_tokens, "examples": len(idx), "step_time_s": elapsed}
        if step == start_step:
            record.update({f"data/{k}": v for k, v in counts.items()})
        tracker.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", pad=f"{record['padding_fraction']:.2f}")

        # 4c. checkpoint every save_steps and at the end
        if (cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0) or step + 1 == total_steps:
            common.save_checkpoint(cfg.output_dir, step + 1, model, optimizer, processor,
                                   {"step": step + 1, "epoch": (step + 1) / steps_per_epoch,
                                    "config": asdict(cfg)}, cfg.save_total_limit, save_dtype)

    # ------------------------------------------------------------------------------------------------
    # 5. Final model: `from_pretrained(output_dir)` loads it with its processor
    # ------------------------------------------------------------------------------------------------
    common.save_pretrained(cfg.output_dir, model.model, processor, save_dtype)
    common.print0(f"saved the model to {cfg.output_dir}")
    tracker.close()
    common.close_distributed()


if __name__ == "__main__":
    main(common.parse_config(Config, __doc__))
