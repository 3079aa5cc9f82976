"""Plumbing every stage script repeats, written once (as nanochat's common.py): the command line, data
files, images, append-only JSONL, which parameters are the vision tower, checkpoint folders, logging.

Nothing here is X-Reasoner's method: the answer format and scoring live in rewards.py, the training math
in sft.py / rl.py. The distributed / FSDP2 / memory-lean log-prob helpers used by sft.py and rl.py are at
the bottom.
"""

import argparse
import dataclasses
import glob
import inspect
import io
import json
import math
import multiprocessing
import os
import re
import sys

import torch

# ----------------------------------------------------------------------------------------------------
# Command line: one dataclass per script; `--help` shows the script's docstring, every field's help,
# its default and (for Literal fields) the allowed values, which the parser enforces.


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_config(config_cls, doc: str, args=None):
    """Parse the command line into `config_cls` (a dataclass) with `doc` as the usage text."""
    from transformers import HfArgumentParser

    # allow_abbrev=False: a renamed or misspelt flag is an error, never a silent prefix match
    parser = HfArgumentParser(config_cls, description=doc, formatter_class=HelpFormatter, allow_abbrev=False)
    cfg, rest = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return cfg


# ----------------------------------------------------------------------------------------------------
# Data files: one loader for every stage


def load_rows(path: str, split: str = "train", config: str | None = None) -> tuple[list, str]:
    """Rows of a dataset and the folder relative image paths start from.

    path: a .jsonl / .json / .parquet / .csv file, a `save_to_disk` folder, or a hub id (then `config`
    and `split` choose the subset). A .json file holds a list of rows, an object of splits
    ({"train": [...], "test": [...]}), {"data": [...]} or {id: row}; else an error naming the file.
    """
    if os.path.isfile(path):
        base = os.path.dirname(os.path.abspath(path))
        ext = os.path.splitext(path)[1]
        if ext == ".jsonl":
            return read_jsonl(path, strict=True)[0], base
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):
                key = split if split in data else "data" if "data" in data else None
                if key is not None and isinstance(data[key], list):
                    data = data[key]
                elif data and all(isinstance(v, dict) for v in data.values()):  # {id: row}
                    data = [{"id": k, **v} for k, v in data.items()]
                else:
                    raise ValueError(f"{path}: a JSON object must be {{split: [rows]}}, {{'data': [rows]}} "
                                     f"or {{id: row}} (no list under {split!r}; keys: {sorted(data)[:10]})")
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a list of rows, got {type(data).__name__}")
            return data, base
        if ext in (".parquet", ".csv"):
            import datasets

            return list(datasets.load_dataset(ext[1:], data_files=path, split="train")), base
        raise ValueError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json, .parquet or .csv)")
    import datasets

    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds and len(ds) != 1:
                raise ValueError(f"{path}: no split {split!r} (have: {', '.join(ds)})")
            ds = ds[split] if split in ds else next(iter(ds.values()))  # a single split: that one
        return list(ds), os.path.abspath(path)
    return list(datasets.load_dataset(path, config or None, split=split)), os.getcwd()


def open_image(image, base_dir: str = ""):
    """An image field as a PIL RGB image: a PIL image, datasets' {"bytes", "path"}, raw bytes, or a path
    (absolute, or relative to `base_dir` or its `images/` folder). No image (None, or a dict with
    neither bytes nor path) -> None."""
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if image is None:
        return None
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, str):
        for p in (image, os.path.join(base_dir, image), os.path.join(base_dir, "images", image)):
            if os.path.isfile(p):
                image = Image.open(p)
                break
        else:
            raise FileNotFoundError(f"image {image!r} not found (also looked in {base_dir or '.'} "
                                    f"and its images/ folder)")
    if image is None or not hasattr(image, "convert"):
        raise ValueError(f"not an image: {str(image)[:80]!r}")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------
# Append-only JSONL (resumable outputs): a line torn by a kill is only ever the last one


def read_jsonl(path: str, strict: bool = False) -> tuple[list, bool]:
    """(records, torn). Input data (strict): every non-empty line must be JSON, else an error naming the
    file and line. Our own append-only outputs (not strict): a last line without its newline was cut by
    a kill and is dropped (torn=True); a bad line before it is an error."""
    if not os.path.exists(path):
        return [], False
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")  # bytes split: text may hold \u2028, which splitlines would cut
    torn = not strict and bool(lines[-1].strip())
    if not strict:
        lines = lines[:-1]
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from None
    return records, torn


def repair_jsonl(path: str) -> list:
    """Records of an append-only JSONL after cutting a line torn by a kill (so appending goes on)."""
    records, torn = read_jsonl(path)
    if torn:
        write_jsonl_atomic(path, records)
    return records


def write_jsonl_atomic(path: str, records: list) -> None:
    """Replace a file atomically (temp file + fsync + rename): a kill leaves the old or the new one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(f, records: list) -> None:
    """Append records to an open file and fsync: on disk before anything that depends on them."""
    for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------
# Which parameters are the vision tower: one rule for every stage (a tower frozen in SFT must not
# train in RL). Covers Qwen2/2.5-VL (`visual.`, `visual.merger`), LLaVA-style (`vision_tower`,
# `multi_modal_projector`), Idefics/SmolVLM (`vision_model`, `connector`), InternVL (`mlp1`).

VISION_KEYS = ("visual.", "vision_tower", "vision_model", "image_encoder")
PROJECTOR_KEYS = ("merger", "multi_modal_projector", "mm_projector", "connector", "mlp1")


def vision_part(name: str) -> str | None:
    """'projector', 'tower' or None (language model) for a parameter name."""
    if any(k in name for k in PROJECTOR_KEYS):
        return "projector"
    if any(k in name for k in VISION_KEYS):
        return "tower"
    return None


def freeze_vision(model, freeze_vision_tower: bool = True, freeze_projector: bool = False) -> int:
    """Freeze the vision tower (and optionally the projector); returns the trainable parameter count."""
    for name, p in model.named_parameters():
        part = vision_part(name)
        if (part == "tower" and freeze_vision_tower) or (part == "projector" and freeze_projector):
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------
# Checkpoint folders: output_dir/checkpoint-N, written atomically (checkpoint-N.tmp, then a rename)


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoint folders, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(m.group(1)) for d in os.listdir(output_dir)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", d)))
    return [os.path.join(output_dir, f"checkpoint-{s}") for s in steps]


def resume_dir(output_dir: str, resume: bool) -> str | None:
    """The checkpoint to continue from. Without --resume, a folder holding an earlier run's checkpoints
    is refused: two runs' checkpoints, logs and samples must never mix."""
    found = list_checkpoints(output_dir)
    if found and not resume:
        raise ValueError(f"{output_dir} holds checkpoints of an earlier run ({os.path.basename(found[-1])}):"
                         " pass --resume to continue it, or choose another --output_dir")
    return found[-1] if found else None


def truncate_log(path: str, step: int) -> None:
    """Keep the lines of a JSONL log with "step" <= step (all gone for step 0): the log then matches
    the checkpoint a run continues from. Atomic."""
    records, _ = read_jsonl(path)
    write_jsonl_atomic(path, [r for r in records if step and r.get("step", 0) <= step])


def prune_checkpoints(output_dir: str, keep: int) -> None:
    import shutil

    for d in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(d)


# ----------------------------------------------------------------------------------------------------
# Logging: log.jsonl always, plus wandb or tensorboard when asked (rank 0 only)


class Tracker:
    """`log(record)` appends to output_dir/log.jsonl and reports to wandb / tensorboard."""

    def __init__(self, output_dir: str, report_to: str = "none", project: str = "x-reasoner",
                 config: dict | None = None, enabled: bool = True):
        self.path, self.enabled, self.backend = os.path.join(output_dir, "log.jsonl"), enabled, None
        self.report_to = report_to
        if not enabled or report_to == "none":
            return
        try:
            if report_to == "wandb":
                import wandb

                self.backend = wandb.init(project=project, config=config, dir=output_dir)
            elif report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.backend = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except ImportError:
            print(f"--report_to {report_to}: not installed; logging to log.jsonl only")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.report_to == "wandb" and self.backend is not None:
            self.backend.log(numbers, step=record.get("step"))
        elif self.backend is not None:
            for k, v in numbers.items():
                self.backend.add_scalar(k, v, record.get("step"))

    def close(self) -> None:
        if self.backend is not None:
            (self.backend.finish if self.report_to == "wandb" else self.backend.close)()


# ----------------------------------------------------------------------------------------------------
# Memory-lean log-probs: never a [tokens, vocab] tensor for the whole batch. At Qwen's vocabulary
# (152,064) full fp32 logits + log-softmax cost ~1.8-2.1 MB per token (27 GiB for 4 x 4096 tokens);
# here the head runs over `chunk_size` tokens at a time and each chunk is recomputed in backward, so
# the peak is one chunk's logits (~0.3 GiB per 512 tokens) whatever the length.


def _chunk_logprobs(hidden, weight, targets, temperature: float, with_entropy: bool):
    logits = (hidden @ weight.t()).float() / temperature  # [c, V]
    lse = torch.logsumexp(logits, dim=-1)  # [c]
    logp = logits.gather(-1, targets[:, None])[:, 0] - lse  # [c]
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)  # [c]
    return logp, entropy


def token_logprobs(hidden, weight, targets, temperature: float = 1.0, chunk_size: int = 512,
                   with_entropy: bool = False):
    """log softmax(hidden @ weight.T / temperature)[target] per row, in fp32.

    hidden [N, H], weight [V, H] (the LM head), targets [N] -> logprobs [N] (differentiable),
    entropy [N] (no gradient) or None. Chunks of `chunk_size` rows, each under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    logps, ents = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            lp, ent = checkpoint(_chunk_logprobs, h, weight, t, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(h, weight, t, temperature, with_entropy)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    entropy = (torch.cat(ents) if ents else logp.detach().clone()) if with_entropy else None
    return logp, entropy


class LogProbModel(torch.nn.Module):
    """A causal LM or VLM that returns the log-probs of given target tokens instead of logits.

    forward(targets, temperature, with_entropy, **model_inputs): targets [B, T] holds at position t the
    token that position t predicts (-100: no log-prob wanted). Returns logprobs [B, T] (0 where -100)
    and entropy [B, T] or None. The decoder runs once; the head only on wanted positions, in chunks.
    Under FSDP2 this wrapper is the root unit, so the head's weight is gathered inside forward."""

    def __init__(self, model, chunk_size: int = 512, touch_vision: bool = False):
        super().__init__()
        self.model, self.chunk_size, self.touch_vision = model, chunk_size, touch_vision
        self.mrope = hasattr(getattr(model, "model", model), "get_rope_index")  # Qwen2-VL / 2.5-VL

    def forward(self, targets, temperature: float = 1.0, with_entropy: bool = False, **inputs):
        pos = inputs.get("position_ids")
        if self.mrope and pos is not None and pos.ndim == 2:
            # M-RoPE models read 2-D position ids as the rotary rows only and then see no sequence
            # boundaries (packed sequences would attend to each other): the text positions go first
            inputs["position_ids"] = pos[None].expand(4, -1, -1)
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
        want = targets != -100  # [B, T]
        head = self.model.get_output_embeddings().weight  # [V, H]
        logp, ent = token_logprobs(hidden[want], head, targets[want], temperature, self.chunk_size,
                                   with_entropy)  # [N]
        out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        logp = out.masked_scatter(want, logp)  # [B, T]
        entropy = out.detach().masked_scatter(want, ent) if with_entropy else None
        if self.touch_vision and torch.is_grad_enabled():
            # Data with images: a trainable projector gets a (zero) gradient on every rank, also from
            # a text-only micro-batch, so FSDP2 reduces the same tensors everywhere.
            logp = logp + 0.0 * sum(p.sum() for n, p in self.model.named_parameters()
                                    if p.requires_grad and vision_part(n))
        return logp, entropy


# ----------------------------------------------------------------------------------------------------
# Packing: several sequences in one row, each with its own position ids (restarting at 0). transformers
# turns position-id resets into a block-diagonal attention mask (sdpa / eager) or varlen kernels
# (flash attention), so packed sequences never see each other.

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


# ----------------------------------------------------------------------------------------------------
# Processes. torchrun and `accelerate launch` both set RANK / LOCAL_RANK / WORLD_SIZE: one process per
# GPU (or per CPU slot: gloo), nanoGPT style. No Accelerator object: several processes always mean
# FSDP2 sharding (below), which Accelerate's FSDP plugin cannot run on CPUs, where the tests run.


def init_distributed():
    """-> (rank, world_size, device). Starts the process group when launched with several processes."""
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, device


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) a list of numbers over processes; the identity in one process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [float(v) for v in values]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Models: load, shard with FSDP2, gather for generation / export


def is_vlm_checkpoint(path: str) -> bool:
    from transformers import AutoConfig

    return hasattr(AutoConfig.from_pretrained(path), "vision_config")


# Packed rows (several sequences per row, position ids restarting at 0) need attention within each
# sequence only. transformers turns restarting position ids into a block-diagonal [W, W] mask, and a
# mask stops sdpa from skipping anything: a row of 8 sequences does all W^2 query-key pairs, 8x what it
# needs, and on GPUs a mask also rules out sdpa's flash kernel. "sdpa_packed" runs sdpa once per
# sequence with is_causal (what flash-attention's varlen kernel does, with the kernels sdpa has); any
# other call (a padding mask, a KV cache: generation) is plain sdpa.
# It also reads one layout transformers' masks cannot: a shared prompt. A sequence whose positions
# start at p > 0 continues the first p tokens of the row's last sequence that started at 0, so GRPO
# lays a group's prompt out once and its other completions attend to that copy (rl.py collate).
PACKED_SDPA = "sdpa_packed"
_SEGMENTS: list = [None, None]  # (position ids, their segments): every layer of a forward reuses them


def _segments(position_ids):
    """[R, W] position ids -> per row (start, end, prefix start, prefix length) of each sequence: a new
    one wherever the position does not go up by 1 (transformers' rule for packed rows); a sequence
    starting at position p > 0 has as prefix the first p columns of the last one that started at 0."""
    if _SEGMENTS[0] is not position_ids:
        pos = position_ids.reshape(-1, position_ids.shape[-1]).cpu()  # one transfer per forward
        new = torch.diff(pos, dim=-1) != 1
        rows = []
        for r in range(pos.shape[0]):
            starts = [0] + (new[r].nonzero().flatten() + 1).tolist()
            ends = starts[1:] + [pos.shape[-1]]
            row, base = [], None
            for s, e, at in zip(starts, ends, pos[r, starts].tolist()):
                if at == 0:
                    base = s
                prefixed = at > 0 and base is not None
                row.append((s, e, base, min(at, s - base)) if prefixed else (s, e, 0, 0))
            rows.append(row)
        _SEGMENTS[:] = [position_ids, rows]
    return _SEGMENTS[1]


def _segment_attention(module, query, key, value, r, seg, **kwargs):
    """One sequence of row r: causal sdpa, after its shared prefix if it has one -> [1, L, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    s, e, base, p = seg
    q, k, v = query[r:r + 1, :, s:e], key[r:r + 1, :, s:e], value[r:r + 1, :, s:e]
    if not p:
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
    if p < e - s:  # a short prefix: one causal call over prefix + sequence (p^2 / 2 pairs more, no mask)
        q, k, v = (torch.cat([t[r:r + 1, :, base:base + p], t[r:r + 1, :, s:e]], dim=2) for t in (query, key, value))
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)[0][:, p:]
    k = torch.cat([key[r:r + 1, :, base:base + p], k], dim=2)
    v = torch.cat([value[r:r + 1, :, base:base + p], v], dim=2)
    mask = torch.ones(e - s, p + e - s, dtype=torch.bool, device=q.device)  # the prefix, then causal
    mask[:, p:] = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
    return sdpa_attention_forward(module, q, k, v, mask[None, None], **kwargs)[0]


def packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """query [R, H, W, D] -> [R, W, H, D]: sdpa per packed sequence; plain sdpa when there is a mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    segments = _segments(position_ids)
    if all(len(row) == 1 and not row[0][3] for row in segments):  # one sequence per row: one causal call
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    if len(segments) != query.shape[0]:  # position ids shared by the batch ([1, W])
        segments = segments * query.shape[0]
    rows = [torch.cat([_segment_attention(module, query, key, value, r, seg, **kwargs) for seg in row], dim=1)
            for r, row in enumerate(segments)]
    return torch.cat(rows), None


def packed_sdpa_mask(attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """No [W, W] mask where packed_sdpa works from the position ids (no padding mask, no cache)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not isinstance(q_offset, torch.Tensor) \
            and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, **kwargs)


def register_packed_sdpa():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def load_model(path: str, device, world_size: int, dtype=torch.float32, attn_implementation=PACKED_SDPA):
    """A causal LM (AutoModelForCausalLM) or VLM (AutoModelForImageTextToText) from a hub id or folder.
    attn_implementation: PACKED_SDPA (above) unless the model uses sliding-window attention.

    One process: real weights in `dtype` on `device`. Several: only rank 0 reads the checkpoint (on
    the CPU); the others build the model on the meta device, and `shard_model` broadcasts rank 0's
    weights into every rank's shard, so a node needs host memory for one copy, not one per GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    if attn_implementation == PACKED_SDPA:
        text = getattr(config, "text_config", config)
        layer_types = getattr(text, "layer_types", None) or []
        if getattr(text, "use_sliding_window", False) or "sliding_attention" in layer_types:
            attn_implementation = "sdpa"  # its mask is not only causal: keep transformers' masks
        register_packed_sdpa()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if world_size == 1:
        return cls.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    if int(os.environ.get("RANK", 0)) == 0:
        model = cls.from_pretrained(path, dtype=dtype, **kwargs)
    else:
        with torch.device("meta"):
            model = cls.from_config(config, dtype=dtype, **kwargs)
    model.generation_config = getattr(model, "generation_config", None)
    return model


def decoder_layers(model) -> list:
    """The language model's decoder layers (the FSDP2 units)."""
    return list(model.get_decoder().layers)


def shard_model(wrapper, device, world_size: int, bf16: bool):
    """FSDP2 (`fully_shard`) over all processes: one unit per decoder layer, and the root unit holding
    the rest (embeddings, LM head, final norm and the whole vision tower). The vision tower stays in
    the root on purpose: a rank whose micro-batch has no image would skip a vision unit's all-gather
    while a rank with images waits for it. bf16: parameters gathered and computed in bf16, gradients
    reduced in fp32 into fp32 shards (the optimizer's master weights). Buffers (rotary `inv_freq`) are
    never cast. Several processes only; in one process the model is returned as it is.

    `wrapper` is a LogProbModel (or any module with `.model`, the HF model); model weights come from
    rank 0 (`load_model`), broadcast into each rank's shard."""
    if world_size == 1:
        return wrapper
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank = dist.get_rank()
    full = wrapper.state_dict() if rank == 0 else None  # rank 0 holds real weights, the others meta
    buffers = {n: b.detach().clone() for n, b in wrapper.named_buffers()} if rank == 0 else None
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(wrapper.model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(wrapper, mp_policy=mp)
    if rank == 0:
        wrapper.to_empty(device=device)
    else:
        wrapper.to_empty(device=device)
    set_model_state_dict(wrapper, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in wrapper.named_buffers():  # non-persistent buffers (inv_freq) are not in the state
        if rank == 0:
            buf.copy_(buffers[name])
        dist.broadcast(buf, src=0)
    wrapper._get_fsdp_state()._lazy_init()  # the wrapper is the root, even if generate runs first
    return wrapper


def fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class gathered_weights:
    """Context: every FSDP2 unit all-gathered and kept so, for transformers' `generate` (whose number
    of forward calls differs between ranks: no collective may run inside). A no-op without FSDP."""

    def __init__(self, model):
        self.units = fsdp_units(model)

    def __enter__(self):
        for m in self.units:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)

    def __exit__(self, *exc):
        for m in reversed(self.units):
            m.reshard()
            m.set_reshard_after_forward(m is not self.units[0], recurse=False)  # the root keeps False


def full_weights(model, dtype=None):
    """Yield (name, full tensor) of an HF model's state dict one at a time, with HF names: FSDP2's
    DTensor shards are all-gathered per tensor (a collective: every rank must consume the generator
    in the same order), then cast to `dtype`. Peak extra memory: one tensor, never the whole model."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        yield name, t.to(dtype) if dtype is not None else t


def grad_norm_and_clip(params: list, max_norm: float) -> float:
    """Global gradient norm over all processes (FSDP2's DTensor shards included), and the clip.
    `params` must be the model's own parameters after sharding (a list taken before `fully_shard`
    holds stale tensors: FSDP1 then clips per rank, FSDP2 sees no gradient at all)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


# ----------------------------------------------------------------------------------------------------
# Training checkpoints: sharded weights + optimizer (torch.distributed.checkpoint: each rank writes its
# shard, and a run may resume on another process count), per-rank RNG, the step; plus a
# `from_pretrained`-loadable copy of the model in bf16 (or fp32) gathered on rank 0.


def save_training_state(path: str, model, optimizer, extra: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(path, "state"))
    rank = int(os.environ.get("RANK", 0))
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()
                if torch.cuda.is_available() else None}, os.path.join(path, "state", f"rng-{rank}.pt"))
    if rank == 0:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump(extra, f, indent=1)


def load_training_state(path: str, model, optimizer) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng = os.path.join(path, "state", f"rng-{int(os.environ.get('RANK', 0))}.pt")
    if os.path.exists(rng):  # absent when resuming on more processes than saved
        r = torch.load(rng, weights_only=False)
        torch.set_rng_state(r["torch"])
        if r["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(r["cuda"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def save_pretrained(path: str, model, processor, dtype=torch.bfloat16) -> None:
    """model (an HF model, maybe FSDP2-sharded) -> `path` in `dtype`, written by rank 0 (collective)."""
    rank = int(os.environ.get("RANK", 0))
    state = {}
    for name, t in full_weights(model, dtype):
        if rank == 0:
            state[name] = t.cpu()
    if rank == 0:
        model.save_pretrained(path, state_dict=state)
        processor.save_pretrained(path)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        for c in [config] + [v for v in config.values() if isinstance(v, dict) and "dtype" in v]:
            c["dtype"] = str(dtype).removeprefix("torch.")  # what from_pretrained(dtype="auto") reads
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def save_checkpoint(output_dir: str, step: int, model, optimizer, processor, extra: dict,
                    keep: int, dtype=torch.bfloat16) -> str:
    """output_dir/checkpoint-{step}: written into checkpoint-{step}.tmp, then renamed (atomic)."""
    import shutil

    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp, rank = final + ".tmp", int(os.environ.get("RANK", 0))
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    save_training_state(tmp, model, optimizer, extra)
    save_pretrained(tmp, model.model, processor, dtype)
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, keep)
    barrier()
    return final


# ----------------------------------------------------------------------------------------------------
# Several GPUs for generation (evaluate.py, distill.py): data-parallel engines, each a copy of the
# script on its own GPUs and its own contiguous block of items, writing its own part files

def check_tensor_parallel(model: str, tensor_parallel_size: int) -> None:
    """Refuse, before anything loads, a tensor-parallel size the model cannot take: vLLM splits the
    attention heads evenly over an engine's GPUs (Qwen2.5-VL-7B has 28: 1, 2, 4 or 7 GPUs)."""
    if tensor_parallel_size <= 1:
        return
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json")
        except Exception:  # noqa: BLE001: offline, or not a hub id; vLLM will say what is wrong
            return
    with open(path) as f:
        config = json.load(f)
    text_config = config.get("text_config") or config  # a VLM's language model
    heads = text_config.get("num_attention_heads") or config.get("num_attention_heads")
    if heads and heads % tensor_parallel_size:
        tp, fit = tensor_parallel_size, math.gcd(heads, tensor_parallel_size)
        raise ValueError(f"--vllm_tensor_parallel_size {tp}: {model} has {heads} attention heads, "
                         f"which {tp} GPUs cannot share evenly. On {tp} GPUs use "
                         f"--vllm_tensor_parallel_size {fit} --num_engines {tp // fit} "
                         f"({tp // fit} engines of {fit} GPUs, data parallel)")


def shard_bounds(shard: str, n_items: int) -> tuple[int, int]:
    """--shard 'i/N' -> [lo, hi): the i-th of N contiguous blocks of the items ('': all of them).
    Contiguous, not i::N, so a call's items stay consecutive and keep one engine's seeds."""
    if not shard:
        return 0, n_items
    m = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not m or int(m[1]) >= int(m[2]):
        raise ValueError(f"--shard {shard!r}: expected i/N with 0 <= i < N, e.g. 0/2")
    i, n = int(m[1]), int(m[2])
    return i * n_items // n, (i + 1) * n_items // n


def shard_path(path: str, shard: str) -> str:
    """What engine i of N writes instead of `path` (data/x.jsonl -> data/x.shard-i-of-N.jsonl)."""
    if not shard:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.shard-{shard.replace('/', '-of-')}{ext}"


def shard_paths(path: str) -> list[str]:
    """Every engine's part file of `path` that exists (any N)."""
    root, ext = os.path.splitext(path)
    found = glob.glob(glob.escape(root) + ".shard-*-of-*" + glob.escape(ext))
    middle = lambda p: p[len(root):len(p) - len(ext)]  # noqa: E731
    return sorted(p for p in found if re.fullmatch(r"\.shard-\d+-of-\d+", middle(p)))


def run_shard(main, cfg, log: str) -> None:
    """An engine's process: its output goes to its log file, then main() on its shard."""
    with open(log, "a") as f:
        os.dup2(f.fileno(), sys.stdout.fileno())
        os.dup2(f.fileno(), sys.stderr.fileno())
    main(cfg)


def run_engines(cfg, main, log_prefix: str) -> None:
    """Data parallel (evaluate.py, distill.py): cfg.num_engines copies of the script (`main`) (fresh interpreters), engine i on
    its own group of GPUs (vllm_tensor_parallel_size of them; hf: one) with --shard i/N. Returns
    when all have finished; raises if one failed (rerun the same command: each engine resumes)."""
    n, per = cfg.num_engines, cfg.vllm_tensor_parallel_size if cfg.backend == "vllm" else 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g for g in visible.split(",") if g.strip()]
    else:
        import torch

        gpus = [str(g) for g in range(torch.cuda.device_count())]
    if gpus and len(gpus) < n * per:
        raise ValueError(f"--num_engines {n} of {per} GPU(s) each needs {n * per} GPUs; "
                         f"{len(gpus)} visible ({','.join(gpus)})")
    spawn = multiprocessing.get_context("spawn")  # not fork: CUDA and vLLM start clean in each
    procs, logs = [], []
    for i in range(n):
        logs.append(f"{log_prefix}shard-{i}-of-{n}.log")
        group = ",".join(gpus[i * per:(i + 1) * per])
        print(f"engine {i}/{n}: GPUs {group or 'none (CPU)'}, log {logs[i]}", flush=True)
        if gpus:  # the child inherits the environment as it is at start()
            os.environ["CUDA_VISIBLE_DEVICES"] = group
        shard_cfg = dataclasses.replace(cfg, num_engines=1, shard=f"{i}/{n}")
        procs.append(spawn.Process(target=run_shard, args=(main, shard_cfg, logs[i])))
        procs[-1].start()
    if gpus and visible is None:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    elif gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    for p in procs:
        p.join()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"engine(s) {failed} failed: see {', '.join(logs[i] for i in failed)}; "
                           "rerun the same command to resume")
