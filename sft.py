"""Stage 1 of X-Reasoner: supervised fine-tuning of a vision-language model on text-only long CoT.

    python sft.py --model_name_or_path tiny-models/vl --dataset toy/sft/openthoughts.jsonl \
        --output_dir runs/sft-toy --max_steps 50 --per_device_batch_size 8 --learning_rate 1e-3
    accelerate launch --config_file configs/fsdp_full_shard.yaml sft.py --output_dir runs/sft   # the paper

The paper: Qwen2.5-VL-7B-Instruct, OpenThoughts-114k (DeepSeek-R1 chains of thought, text only), vision
encoder frozen, AdamW lr 1e-5, no weight decay, 4 epochs, lr x0.8 per epoch, 4 examples per GPU on 32
GPUs, examples truncated to 4096 tokens.

Data: a hub id or a local file/folder (JSONL, JSON, Parquet, or a `save_to_disk` folder), in one of two
shapes. OpenThoughts (`system`, `conversations`): the user turn becomes `rewards.train_prompt(question)`
and the assistant's <|begin_of_thought|>/<|begin_of_solution|> sections become
`rewards.format_response(thinking, solution)`. Chat (`messages` = [{role, content}], optional `images`:
paths relative to the data file, or PIL images); a content may be a list with {"type": "image"} items,
otherwise the images go before the text of the first user turn.

The loss is the mean over every supervised (assistant) token of the global step, whatever the split into
micro-batches and processes. Examples are packed into rows with per-example position ids; transformers
turns position-id resets into a block-diagonal attention mask (sdpa/eager) or varlen kernels (flash
attention), so packed examples never see each other. Qwen2.5-VL gets 4-row position ids: the text
positions (used to find the example boundaries) and the three M-RoPE rows.

Writes `output_dir/log.jsonl` (one line per step), `output_dir/checkpoint-N/` (model + processor,
`from_pretrained`-loadable, with the optimizer/RNG state in `state/`), and the final model in `output_dir`.
"""

import glob
import inspect
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import HfArgumentParser

import rewards


@dataclass
class SFTConfig:
    # model and data
    model_name_or_path: str = field(default="Qwen/Qwen2.5-VL-7B-Instruct", metadata={"help": "hub id or folder; VLMs load with AutoModelForImageTextToText, text models with AutoModelForCausalLM (paper: Qwen2.5-VL-7B-Instruct)"})
    dataset: str = field(default="open-thoughts/OpenThoughts-114k", metadata={"help": "hub id, or a local .jsonl/.json/.parquet file or folder (paper: OpenThoughts-114k)"})
    dataset_config: str = field(default="", metadata={"help": "hub dataset config name, if any"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on"})
    max_examples: int = field(default=0, metadata={"help": "use only the first N rows (0 = all)"})
    keep_system_prompt: bool = field(default=False, metadata={"help": "keep the dataset's own system prompt (paper: dropped; its prompt format has none)"})
    on_bad_row: str = field(default="error", metadata={"help": "a malformed row: 'error' (stop, naming file, row and field) or 'skip' (drop it and count it)"})
    assistant_header: str = field(default="<|im_start|>assistant\n", metadata={"help": "text that opens an assistant turn in the chat template (Qwen's)"})
    end_of_turn: str = field(default="<|im_end|>", metadata={"help": "token that ends a turn; supervised, so the model learns to stop"})
    output_dir: str = field(default="runs/sft", metadata={"help": "checkpoints, log.jsonl and the final model"})
    # sequence length and batching
    max_length: int = field(default=4096, metadata={"help": "longest example in tokens (paper: 4096)"})
    overlong: str = field(default="truncate", metadata={"help": "longer examples: 'truncate' (paper) or 'drop'; an example whose cut would split an image is dropped; both counted"})
    packing: bool = field(default=True, metadata={"help": "pack each micro-batch's examples into as few rows as fit pack_length (attention kept per example); off = one padded row per example"})
    pack_length: int = field(default=0, metadata={"help": "row length for packing; 0 = the micro-batch's longest example, so rows are never longer than padded ones (sdpa/eager attention cost grows with row length; with flash attention, max_length packs tightest)"})
    per_device_batch_size: int = field(default=4, metadata={"help": "examples per process per micro-batch (paper: 4)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step; global batch = processes x this x per_device_batch_size (paper: 32 x 1 x 4 = 128)"})
    # optimisation
    epochs: int = field(default=4, metadata={"help": "passes over the data (paper: 4)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; overrides epochs when > 0"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate (paper: 1e-5)"})
    lr_schedule: str = field(default="epoch_decay", metadata={"help": "'epoch_decay' (paper: lr x lr_decay after each epoch, stepwise), 'cosine' or 'linear' (to 0, after warm-up)"})
    lr_decay: float = field(default=0.8, metadata={"help": "multiplicative decay per epoch for epoch_decay (paper: 0.8)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps with linear warm-up (paper: none stated)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0.0)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (paper: 0.9)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (paper: 0.999)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm (paper: not stated; 1.0 is the common default; 0 = off)"})
    freeze_vision: bool = field(default=True, metadata={"help": "freeze the vision tower (paper: frozen vision encoder)"})
    freeze_projector: bool = field(default=False, metadata={"help": "also freeze the vision-to-language projector (Qwen's merger; paper: not stated)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward (needed for 7B at 4096 tokens)"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on GPU, fp32 master weights (lr 1e-5 updates vanish in bf16 weights); the CPU always runs fp32"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "'sdpa', 'eager' or 'flash_attention_2' (GPU)"})
    seed: int = field(default=42, metadata={"help": "data order and initialisation seed"})
    # checkpoints and logging
    save_steps: int = field(default=500, metadata={"help": "save a checkpoint every N steps (and always at the end; 0 = only at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep only the newest N checkpoints (0 = keep all)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir (weights, optimizer, RNG, data position)"})
    report_to: str = field(default="none", metadata={"help": "'none', 'wandb' or 'tensorboard' (as well as log.jsonl)"})


# ----------------------------------------------------------------------------------------------------------------
# Data: rows -> conversations
# ----------------------------------------------------------------------------------------------------------------
class BadRow(ValueError):
    pass


def load_rows(path: str, config: str = "", split: str = "train"):
    """Rows of a local file/folder or a hub dataset, as (list of dicts, folder images are relative to)."""
    if os.path.isfile(path):
        base = os.path.dirname(os.path.abspath(path))
        if path.endswith(".jsonl"):
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()], base
        if path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
            return (data if isinstance(data, list) else data[split]), base
        import datasets
        kind = {".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(path)[1])
        if kind is None:
            raise ValueError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .csv)")
        return datasets.load_dataset(kind, data_files=path, split="train"), base
    import datasets
    if os.path.isdir(path) and glob.glob(os.path.join(path, "*.json")) and (
            os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json"))):
        ds = datasets.load_from_disk(path)
        return (ds[split] if isinstance(ds, datasets.DatasetDict) else ds), os.path.abspath(path)
    base = os.path.abspath(path) if os.path.isdir(path) else os.getcwd()
    return datasets.load_dataset(path, config or None, split=split), base


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


def load_image(im):
    from PIL import Image
    return (Image.open(im) if isinstance(im, str) else im).convert("RGB")


def tokenize_example(messages, images, processor, tokenizer, header, end_id, rope_index=None):
    """-> dict(ids, targets, images, positions: [3, L] M-RoPE ids for image examples, else None)."""
    text = processor.apply_chat_template(messages, tokenize=False)
    if images:
        enc = processor(text=[text], images=[load_image(im) for im in images], return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        positions = rope_index(enc["input_ids"], enc["image_grid_thw"]) if rope_index else None  # [3, L]
    else:
        ids, positions = tokenizer(text, add_special_tokens=False)["input_ids"], None
    mask = assistant_token_mask(ids, header, end_id)
    return {"ids": ids, "targets": next_token_targets(ids, mask), "images": images, "positions": positions}


def make_rope_index(model, image_token_id: int):
    """Qwen2/2.5-VL's M-RoPE position ids for one example (input_ids [1, L]) -> [3, L]."""
    get_rope_index = getattr(getattr(model, "model", model), "get_rope_index", None)
    if get_rope_index is None:
        return None
    takes_types = "mm_token_type_ids" in inspect.signature(get_rope_index).parameters  # transformers >= 5.x

    def rope_index(input_ids, image_grid_thw):
        kwargs = {"image_grid_thw": image_grid_thw}
        if takes_types:
            kwargs["mm_token_type_ids"] = (input_ids == image_token_id).int()
        with torch.no_grad():
            return get_rope_index(input_ids, **kwargs)[0][:, 0]
    return rope_index


# ----------------------------------------------------------------------------------------------------------------
# Batching: pack examples into rows with per-example position ids
# ----------------------------------------------------------------------------------------------------------------
def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices grouped into rows of at most `capacity` tokens."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[k].append(i)
            room[k] -= lengths[i]
    return rows


def collate(examples: list[dict], rows: list[list[int]], pad_id: int, mrope: bool) -> dict:
    """Rows of examples -> model inputs. Padding fills each row's tail as its own segment (positions restart
    at 0, targets -100), so packed and padded batches take the same attention-isolation path."""
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
        text_pos[r, t:] = torch.arange(width - t)
        rope_pos[:, r, t:] = torch.arange(width - t)
    batch = {"input_ids": input_ids, "targets": targets, "images": images,
             "padding_fraction": 1 - real / (R * width), "tokens": real}
    # Qwen2.5-VL: [4, R, width] = text positions (mark the example boundaries) + the three M-RoPE rows
    batch["position_ids"] = torch.cat([text_pos[None], rope_pos]) if mrope else text_pos
    return batch


def token_loss_sum(model, batch: dict, pixel_inputs: dict) -> torch.Tensor:
    """Sum of cross-entropies over the supervised tokens. Logits only where some row has a target."""
    targets = batch["targets"]  # [R, W]
    keep = (targets != -100).any(0).nonzero().squeeze(1)  # [K] columns with at least one target
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                logits_to_keep=keep, use_cache=False, **pixel_inputs)
    logits = out.logits.float()  # [R, K, vocab]
    return F.cross_entropy(logits.flatten(0, 1), targets[:, keep].flatten(), ignore_index=-100, reduction="sum")


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: SFTConfig) -> float:
    """Learning rate at optimizer step `step` (0-based)."""
    warmup = int(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.lr_schedule == "epoch_decay":  # the paper: x0.8 after every epoch, stepwise
        return cfg.learning_rate * cfg.lr_decay ** (step // steps_per_epoch)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.lr_schedule == "cosine":
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "linear":
        return cfg.learning_rate * (1 - progress)
    raise ValueError(f"--lr_schedule {cfg.lr_schedule!r}: use epoch_decay, cosine or linear")


def global_batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """The examples of optimizer step `step`: a seeded shuffle per epoch, the incomplete tail dropped."""
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[k * global_batch:(k + 1) * global_batch]


def list_checkpoints(output_dir: str) -> list[str]:
    found = [d for d in glob.glob(os.path.join(output_dir, "checkpoint-*")) if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    return sorted(found, key=lambda d: int(d.rsplit("-", 1)[1]))


def main(cfg: SFTConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    # ------------------------------------------------------------------------------------------------------------
    # 1. Set-up: processes, model, processor, frozen parts
    # ------------------------------------------------------------------------------------------------------------
    for name, allowed in [("overlong", ("truncate", "drop")), ("on_bad_row", ("error", "skip")),
                          ("lr_schedule", ("epoch_decay", "cosine", "linear")), ("report_to", ("none", "wandb", "tensorboard"))]:
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} {getattr(cfg, name)!r}: use one of {', '.join(allowed)}")
    model_config = AutoConfig.from_pretrained(cfg.model_name_or_path)
    is_vlm = hasattr(model_config, "vision_config")
    log_with = None if cfg.report_to == "none" else cfg.report_to
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # (torchrun on the CPU: gloo processes, else Accelerate sees one)
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, log_with=log_with, project_dir=cfg.output_dir,
        mixed_precision="bf16" if cfg.bf16 and torch.cuda.is_available() else "no",
        # text-only batches leave a trainable projector unused: DDP must not wait for its gradients
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=is_vlm)],
    )
    set_seed(cfg.seed)
    world = accelerator.num_processes
    cfg.gradient_accumulation_steps = accelerator.gradient_accumulation_steps  # a DeepSpeed config's value wins
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
    checkpoints = list_checkpoints(cfg.output_dir)
    resume_dir = checkpoints[-1] if cfg.resume and checkpoints else None
    if cfg.resume and resume_dir is None:
        accelerator.print(f"--resume: no checkpoint in {cfg.output_dir}, starting from the beginning")
    if not cfg.resume and checkpoints:  # never mix two runs' checkpoints
        raise ValueError(f"{cfg.output_dir} holds checkpoints of an earlier run: pass --resume, or another --output_dir")

    model_cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = model_cls.from_pretrained(cfg.model_name_or_path, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    processor = (AutoProcessor if is_vlm else AutoTokenizer).from_pretrained(cfg.model_name_or_path)
    tokenizer = getattr(processor, "tokenizer", processor)
    model.config.use_cache = False
    for name, p in model.named_parameters():
        projector = any(k in name for k in ("merger", "multi_modal_projector", "mm_projector"))
        vision = any(k in name for k in ("visual.", "vision_tower", "vision_model"))
        if (projector and cfg.freeze_projector) or (vision and not projector and cfg.freeze_vision):
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())

    # ------------------------------------------------------------------------------------------------------------
    # 2. Data: rows -> conversations -> token ids and next-token targets (assistant turns only)
    # ------------------------------------------------------------------------------------------------------------
    rows, base_dir = load_rows(cfg.dataset, cfg.dataset_config, cfg.dataset_split)
    n_rows = min(len(rows), cfg.max_examples) if cfg.max_examples > 0 else len(rows)
    header = tokenizer.encode(cfg.assistant_header, add_special_tokens=False)
    end_id = tokenizer.convert_tokens_to_ids(cfg.end_of_turn)
    image_token_id = getattr(model_config, "image_token_id", None)
    rope_index = make_rope_index(model, image_token_id) if is_vlm else None
    counts = {"rows": n_rows, "bad_rows": 0, "truncated": 0, "dropped_overlong": 0, "dropped_image_cut": 0, "dropped_no_target": 0}
    examples = []
    for i in tqdm(range(n_rows), desc="tokenising", disable=not accelerator.is_local_main_process):
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
            ex["ids"], ex["targets"] = ex["ids"][:cfg.max_length], ex["targets"][:cfg.max_length - 1] + [-100]
            ex["positions"] = None if ex["positions"] is None else ex["positions"][:, :cfg.max_length]
        ex["n_targets"] = sum(t != -100 for t in ex["targets"])
        if ex["n_targets"] == 0:
            counts["dropped_no_target"] += 1  # e.g. the prompt alone is longer than max_length
            continue
        counts["truncated"] += truncated
        # int32 tensors: Python int lists would take ~9x the memory (114k x 4096 tokens x 2 per process)
        ex["ids"], ex["targets"] = torch.tensor(ex["ids"], dtype=torch.int32), torch.tensor(ex["targets"], dtype=torch.int32)
        examples.append(ex)
    global_batch = world * cfg.gradient_accumulation_steps * cfg.per_device_batch_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.dataset}: {len(examples)} usable examples ({json.dumps(counts)}), fewer than one global batch of {global_batch}")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    accelerator.print(f"model {cfg.model_name_or_path}: {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained | "
                      f"data {json.dumps(counts)}, {len(examples)} examples | {total_steps} steps, "
                      f"{steps_per_epoch} per epoch, global batch {global_batch} examples on {world} processes")

    # ------------------------------------------------------------------------------------------------------------
    # 3. Optimizer; resume weights, optimizer and RNG state
    # ------------------------------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = 0
    if resume_dir is not None:
        accelerator.load_state(os.path.join(resume_dir, "state"))
        with open(os.path.join(resume_dir, "trainer_state.json")) as f:
            start_step = json.load(f)["step"]
        accelerator.print(f"resumed from {resume_dir} at step {start_step}")
    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    if accelerator.is_main_process:  # keep the log consistent with the checkpoint we continue from
        old = open(log_path).read().splitlines() if os.path.exists(log_path) else []
        with open(log_path, "w") as f:
            f.writelines(line + "\n" for line in old if start_step and json.loads(line).get("step", 0) <= start_step)
    if log_with:
        accelerator.init_trackers("x-reasoner-sft", config=asdict(cfg))
        if not accelerator.trackers:
            accelerator.print(f"--report_to {cfg.report_to}: not installed; logging to log.jsonl only")

    def save_checkpoint(step: int):
        """Write checkpoint-{step} atomically: everything into a temp folder, then one rename."""
        final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
        tmp = final + ".tmp"
        if accelerator.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(os.path.join(tmp, "state"))  # optimizer, RNG of every process, weights
        state_dict = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "epoch": step / steps_per_epoch, "config": asdict(cfg)}, f, indent=1)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            old = list_checkpoints(cfg.output_dir)
            for d in old[:-cfg.save_total_limit] if cfg.save_total_limit > 0 else []:
                shutil.rmtree(d)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------------------
    # 4. Training loop
    # ------------------------------------------------------------------------------------------------------------
    model.train()
    b, rank = cfg.per_device_batch_size, accelerator.process_index
    image_processor = getattr(processor, "image_processor", None)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="sft",
               disable=not accelerator.is_local_main_process)
    for step in bar:
        t0 = time.time()
        lr = lr_at(step, total_steps, steps_per_epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = global_batch_indices(step, len(examples), global_batch, cfg.seed)
        # the loss is sum(token losses) / (supervised tokens of the whole global step); every process knows
        # the global count, and the factor world x accumulation undoes DDP's mean and Accelerate's 1/accumulation
        n_tokens = sum(examples[i]["n_targets"] for i in idx)
        loss_sum, tokens, pad_slots, slots = torch.zeros((), device=accelerator.device), 0, 0.0, 0

        # 4a. forward/backward over this process's micro-batches
        for m in range(cfg.gradient_accumulation_steps):
            mine = [examples[i] for i in idx[(m * world + rank) * b:(m * world + rank + 1) * b]]
            lengths = [len(ex["ids"]) for ex in mine]
            rows = pack_rows(lengths, max(cfg.pack_length, *lengths)) if cfg.packing else [[i] for i in range(len(mine))]
            batch = collate(mine, rows, tokenizer.pad_token_id, mrope=rope_index is not None)
            pixel_inputs = {}
            if batch["images"]:
                pixel_inputs = dict(image_processor(images=[load_image(im) for im in batch["images"]], return_tensors="pt"))
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pixel_inputs = {k: v.to(accelerator.device) for k, v in pixel_inputs.items()}
            with accelerator.accumulate(model):
                micro_sum = token_loss_sum(model, batch, pixel_inputs)
                accelerator.backward(micro_sum / n_tokens * world * cfg.gradient_accumulation_steps)
                grad_norm = None
                if accelerator.sync_gradients:
                    if cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    else:
                        grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += micro_sum.detach()
            tokens += batch["tokens"]
            width = batch["input_ids"].shape[1] * batch["input_ids"].shape[0]
            slots, pad_slots = slots + width, pad_slots + batch["padding_fraction"] * width

        # 4b. log: global token-mean loss, lr, grad norm, throughput, padding
        totals = accelerator.reduce(torch.tensor([loss_sum.item(), tokens, pad_slots, slots], dtype=torch.float64, device=accelerator.device), "sum")
        elapsed = time.time() - t0
        record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": totals[0].item() / n_tokens,
                  "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "tokens_per_s": totals[1].item() / elapsed, "padding_fraction": totals[2].item() / totals[3].item(),
                  "supervised_tokens": n_tokens, "examples": len(idx), "step_time_s": elapsed}
        if step == start_step:
            record.update({f"data/{k}": v for k, v in counts.items()})
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", pad=f"{record['padding_fraction']:.2f}")
        if log_with:
            accelerator.log(record, step=step + 1)

        # 4c. checkpoint every save_steps and at the end
        if (cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0) or step + 1 == total_steps:
            save_checkpoint(step + 1)

    # ------------------------------------------------------------------------------------------------------------
    # 5. Final model: `from_pretrained(output_dir)` loads it with its processor
    # ------------------------------------------------------------------------------------------------------------
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(cfg.output_dir, state_dict=state_dict)
        processor.save_pretrained(cfg.output_dir)
        accelerator.print(f"saved the model to {cfg.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    (config,) = HfArgumentParser(SFTConfig).parse_args_into_dataclasses()
    main(config)
