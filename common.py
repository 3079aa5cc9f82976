"""Plumbing every stage script repeats, written once (as nanochat's common.py): the command line, data
files, images, append-only JSONL, which parameters are the vision tower, checkpoint folders, logging.

Nothing here is X-Reasoner's method: the answer format and scoring live in rewards.py, the training math
in sft.py / rl.py. The distributed / FSDP2 / memory-lean log-prob helpers used by sft.py and rl.py are at
the bottom.
"""

import argparse
import io
import json
import os
import re

import torch

# ----------------------------------------------------------------------------------------------------
# Command line: one dataclass per script; `--help` shows the script's docstring, every field's help,
# its default and (for Literal fields) the allowed values, which the parser enforces.


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_config(config_cls, doc: str, args=None):
    """Parse the command line into `config_cls` (a dataclass) with `doc` as the usage text."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_cls, description=doc, formatter_class=HelpFormatter)
    (cfg,) = parser.parse_args_into_dataclasses(args=args)
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
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r} (have: {', '.join(ds)})")
            ds = ds[split]
        return list(ds), os.path.abspath(path)
    return list(datasets.load_dataset(path, config or None, split=split)), os.getcwd()


def open_image(image, base_dir: str = ""):
    """An image field as a PIL RGB image: a PIL image, datasets' {"bytes", "path"}, raw bytes, or a path
    (absolute, or relative to `base_dir` or its `images/` folder)."""
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
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
        self.report_to = report_to

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

    def __init__(self, model, chunk_size: int = 512):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, targets, temperature: float = 1.0, with_entropy: bool = False, **inputs):
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
        want = targets != -100  # [B, T]
        head = self.model.get_output_embeddings().weight  # [V, H]
        logp, ent = token_logprobs(hidden[want], head, targets[want], temperature, self.chunk_size,
                                   with_entropy)  # [N]
        out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        logp = out.masked_scatter(want, logp)  # [B, T]
        entropy = out.detach().masked_scatter(want, ent) if with_entropy else None
        return logp, entropy
