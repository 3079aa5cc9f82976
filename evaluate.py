"""Evaluate a model on the X-Reasoner paper's benchmarks: general and medical, text and images.

    python evaluate.py --model_name_or_path microsoft/X-Reasoner-7B --output_dir runs/eval/xr   # greedy
    python evaluate.py ... --num_engines 8                 # 8 GPUs: 8 engines, data parallel
    python evaluate.py ... --benchmarks gsm8k,mmmu_val --num_samples 5 --temperature 0.3   # avg/maj/pass@5
    python evaluate.py ... --data_dir data/eval            # local copies: DIR/<benchmark>.jsonl|.json|.parquet|/
    python evaluate.py ... --text_solvable_removed         # also answer image items without their image
    python evaluate.py --compare runs/eval/base runs/eval/xr --output_dir runs/eval/compare

Every benchmark is converted to one item shape: {id, question (with `<image k>` placeholders), images
(PIL), options (letter -> text, or None), gold (a letter for multiple choice, else the answer text),
kind ("mcq" | "math" | "free")}. Questions are posed with rewards.py's prompts and scored with
rewards.accuracy_reward, exactly as in training; a parse failure is `extract_answer` returning None.

Outputs in --output_dir: `<benchmark>.jsonl` (one line per item: prompt, responses, extracted answers,
correctness, tokens, truncation, forced exit), `summary.json` and `results.md`. The JSONL is
append-only and fsynced per batch, so a killed run resumes where it stopped (finished items skipped).

Several GPUs: `--num_engines N` starts N copies of this script (data parallel), each with its own
`--vllm_tensor_parallel_size` GPUs and `--shard i/N`, the i-th contiguous block of every
benchmark's items; each appends to its own `<benchmark>.shard-i-of-N.jsonl` (resumable; its log is
shard-i-of-N.log). The parts are then merged into `<benchmark>.jsonl` in the items' order and the
summary is computed once from the merged records. Item p's samples keep their seeds, so the numbers
equal one engine's (vLLM: per-request seeds; hf: when each `generate` call holds one item,
`--generation_batch_size 1` greedy or `--items_per_call 1` sampled). `--shard i/N` also runs one
block by hand (another node); a later run without it merges the parts. A 7B model fits one GPU:
on 8 GPUs, 8 engines of 1 GPU beat one engine split 8 ways (which the 7B's 28 heads cannot take).
"""

import ast
import hashlib
import json
import os
import random
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

from PIL import Image
from tqdm import tqdm

import common
from common import open_image
import rewards
from generation import Completion, chat_prompt, generate, load_engine

PAPER_BENCHMARKS = ["gsm8k", "mmlu_pro", "mmmu_val", "mmmu_pro_standard", "mmstar", "mathvista_testmini",
                    "mathvision", "medqa", "medqa_4opt", "mmlu_pro_health", "mmmu_health", "mmmu_pro_health",
                    "medxpertqa_mm", "omnimedvqa", "nejm"]


@dataclass
class Config:
    # model and data
    model_name_or_path: str = field(
        default="",
        metadata={"help": "hub id or folder of the model to evaluate (paper: X-Reasoner-7B)"},
    )
    benchmarks: list[str] = field(
        default_factory=lambda: list(PAPER_BENCHMARKS),
        metadata={"help": "benchmark names, comma or space separated (default: "
                          "the paper's 15; see REGISTRY in evaluate.py for all)"},
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "local copies: DIR/<name>.jsonl|.json|.parquet or a "
                          "save_to_disk folder DIR/<name>/ (unset: the hub)"},
    )
    limit: int = field(
        default=0,
        metadata={"help": "only the first N items of each benchmark, "
                          "after subset filtering (0: all)"},
    )
    output_dir: str = field(
        default="runs/eval",
        metadata={"help": "per-item JSONL, summary.json, results.md (and compare.md/.png)"},
    )
    # prompting and sampling
    prompt_template: Literal["paper", "plain"] = field(
        default="paper",
        metadata={"help": "'paper': the paper's MCQ / R1-Zero math prompt; 'plain': the "
                          "question alone, options below it (for tiny toy models, which "
                          "cannot find a problem behind the paper's long instructions)"},
    )
    max_new_tokens: int = field(
        default=4096,
        metadata={"help": "total cap on generated tokens (paper: 4096)"},
    )
    think_budget: int | None = field(
        default=3584,
        metadata={"help": "forced exit: after this many thinking tokens append </think> "
                          "and let the model answer; 0 = off (paper: on, budget not "
                          "stated; 3584 leaves 512 of the 4096 tokens for the answer)"},
    )
    num_samples: int = field(
        default=1,
        metadata={"help": "samples per item: 1 (greedy headline "
                          "numbers); paper also 5 -> avg/maj/pass@5"},
    )
    temperature: float = field(
        default=0.0,
        metadata={"help": "0 = greedy (paper's headline numbers); paper's 5-sample runs: 0.3"},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "nucleus sampling when temperature > 0"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "sampling seed: item p, sample j uses seed + "
                          "p * num_samples + j (hf: one seed per call)"},
    )
    text_solvable_removed: bool = field(
        default=False,
        metadata={"help": "paper's analysis: also answer image items without their "
                          "image; report accuracy on the items not solved that way"},
    )
    max_pixels: int = field(
        default=262144,
        metadata={"help": "downscale larger images to this many "
                          "pixels (model card: 512x512); 0 = off"},
    )
    # generation backend
    backend: Literal["vllm", "hf", "replay"] = field(
        default="vllm",
        metadata={"help": "vllm (paper) | hf (transformers generate) "
                          "| replay (scripted, tests only)"},
    )
    replay_file: str | None = field(
        default=None,
        metadata={"help": "replay backend: JSONL of {\"benchmark\", \"id\", "
                          "\"responses\": [...], \"noimage_responses\": [...]}"},
    )
    items_per_call: int = field(
        default=512,
        metadata={"help": "items per generation call; the JSONL is flushed and fsynced after each"},
    )
    generation_batch_size: int = field(
        default=64,
        metadata={"help": "hf backend: sequences per `generate` call"},
    )
    num_engines: int = field(
        default=1,
        metadata={"help": "data parallel: this many engines, each on its own "
                          "vllm_tensor_parallel_size GPUs (hf: one) and its "
                          "own block of every benchmark (7B on 8 GPUs: 8)"},
    )
    shard: str = field(
        default="",
        metadata={"help": "'i/N': evaluate only the i-th of N contiguous "
                          "blocks of each benchmark, into part files (set by "
                          "--num_engines; by hand for other nodes); '': all"},
    )
    vllm_tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "vllm backend: GPUs per engine; must divide the attention "
                          "heads (Qwen2.5-VL-7B: 28 heads, so 1, 2, 4 or 7)"},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9,
        metadata={"help": "vllm backend: fraction of GPU memory for weights and KV cache"},
    )
    vllm_max_model_len: int | None = field(
        default=None,
        metadata={"help": "vllm backend: context length (default: the model's)"},
    )
    vllm_kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={"help": "vllm backend: fixed KV cache size (CPU tests: 256 MiB)"},
    )
    compare: list[str] = field(
        default_factory=list,
        metadata={"help": "instead of evaluating: tabulate and plot these run folders"},
    )
    nejm_image_dir: str | None = field(
        default=None,
        metadata={"help": "NEJM Image Challenge: folder of its images named by the item's date "
                          "(IC20230105.jpg or 20230105.png), for dumps without an image / "
                          "image_path column; an item whose image is missing is skipped and "
                          "counted"},
    )


# ---- Images and options: the small pieces every converter shares ----------------------------------
LETTERS = rewards.LETTERS
HEALTH_SUBJECTS = {"Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                   "Pharmacy", "Public_Health"}  # MMMU's "Health & Medicine" discipline (MMMU-Health)


def lettered(texts) -> dict:
    """["x", "y"] -> {"A": "x", "B": "y"}."""
    return {LETTERS[i]: str(t).strip() for i, t in enumerate(texts)}


def letter_of(options: dict, text) -> str | None:
    """The letter whose option text is `text` (gold given as text: MathVista, OmniMedVQA); None if absent."""
    norm = lambda s: " ".join(str(s).split()).casefold()
    return next((k for k, v in options.items() if norm(v) == norm(text)), None)


def row_id(row: dict, *keys) -> str:
    """The item's id: the first of `keys` present in the row, else its position in the data file."""
    return next((str(row[k]) for k in keys if row.get(k) not in (None, "")), str(row["_index"]))


class SkipItem(Exception):
    """An item the data cannot pose as the benchmark asks (its image is missing): skipped, named, counted."""


def make_item(id, question, images, options, gold, kind, needs_image=False, **extra) -> dict:
    """The item; an image the question or an option mentions (`<image k>`), or that the benchmark always has
    (needs_image), but the data does not provide is a SkipItem, never a silent text-only item."""
    mentioned = [int(k) for k in re.findall(r"<image (\d+)>", " ".join([question, *(options or {}).values()]))]
    missing = sorted({k for k in mentioned if k > len(images) or images[k - 1] is None})
    if missing or (needs_image and not any(im is not None for im in images)):
        raise SkipItem(f"item {id!r}: image {', '.join(map(str, missing)) or 1} not in the data")
    return {"id": id, "question": question, "images": [im for im in images if im is not None],
            "options": options, "gold": gold, "kind": kind, **extra}


_INLINE_HEADER = re.compile(r"(?:^|\n|\s)(?:Answer\s+Choices|Options|Choices)\s*:\s*", re.I)
_INLINE_LABEL = re.compile(r"(?:^|(?<=[\s,;]))(?:\(([A-Z])\)|([A-Z])[.:)])(?=\s|$)")


def inline_options(question: str):
    """(stem, {letter: text}) for options written inside the question, in any common shape:
    "Options: A: x, B: y", "Choices:\n(A) x\n(B) y", "Answer Choices: (A) x (B) y", "A. x" lines at the end.
    The letters must run A, B, C, ... in order (so "(A) 40.7" rows keep their count and order); None if not."""
    q = str(question)
    heads = list(_INLINE_HEADER.finditer(q))
    if heads:
        stem, rest = q[:heads[-1].start()], q[heads[-1].end():]
    else:  # no header: a block of labelled lines that ends the question
        lines = q.rstrip().split("\n")
        k = len(lines)
        while k > 0 and re.match(r"\s*(?:\([A-Z]\)|[A-Z][.:)])\s", lines[k - 1] + " "):
            k -= 1
        stem, rest = "\n".join(lines[:k]), "\n".join(lines[k:])
    marks, want = [], 0
    for m in _INLINE_LABEL.finditer(rest):
        letter = m.group(1) or m.group(2)
        if letter == LETTERS[want] and (want or not rest[:m.start()].strip()):
            marks.append(m)
            want += 1
            if want == len(LETTERS):
                break
    if len(marks) < 2:
        return None
    ends = [m.start() for m in marks[1:]] + [len(rest)]
    options = {LETTERS[i]: rest[m.end():e].strip().rstrip(",;").strip() for i, (m, e) in enumerate(zip(marks, ends))}
    return stem.strip(), options


# ---- Converters: one per data shape (fields as on each dataset's card) ----------------------------
def convert_gsm8k(row, base):  # openai/gsm8k: question, answer "...#### 72"
    gold = rewards.final_answer(row["answer"]).replace(",", "")
    return make_item(row_id(row, "id"), row["question"], [], None, gold, "math")


def convert_mmlu_pro(row, base):  # TIGER-Lab/MMLU-Pro: options list padded with "N/A", letter answer
    kept = [(i, o) for i, o in enumerate(row["options"]) if str(o).strip() != "N/A"]
    gold_index = row.get("answer_index")
    if gold_index is None:
        gold_index = LETTERS.index(str(row["answer"]).strip())
    gold = next((LETTERS[j] for j, (i, _) in enumerate(kept) if i == gold_index), None)
    return make_item(row_id(row, "question_id"), row["question"], [], lettered(o for _, o in kept), gold, "mcq")


def convert_mmmu(row, base):  # MMMU/MMMU and MMMU_Pro standard: `<image k>` placeholders, options a str list
    images = [open_image(row.get(f"image_{k}"), base) for k in range(1, 8)]
    opts = row.get("options") or "[]"
    opts = ast.literal_eval(opts) if isinstance(opts, str) else list(opts)  # literal_eval: data, never code
    gold = row["answer"]
    if row.get("question_type") == "open" or not opts:
        if isinstance(gold, str) and gold.strip().startswith("["):
            gold = [str(g) for g in ast.literal_eval(gold)]  # open answers may list accepted variants
        return make_item(row_id(row, "id"), row["question"], images, None, gold, "free")
    return make_item(row_id(row, "id"), row["question"], images, lettered(opts), str(gold).strip(), "mcq")


def convert_mmmu_pro_vision(row, base):  # MMMU_Pro vision: the question and its options are in the image
    opts = row["options"]
    opts = ast.literal_eval(opts) if isinstance(opts, str) else list(opts)
    question = "<image 1>\nThe question and its options are shown in the image."
    return make_item(row_id(row, "id"), question, [open_image(row["image"], base)], lettered(opts),
                     str(row["answer"]).strip(), "mcq", options_in_image=True)


def convert_mmstar(row, base):  # Lin-Chen/MMStar: options inline, "Options: A: x, B: y" or "(A) x" lines
    found = inline_options(row["question"])
    if found is None:
        raise ValueError(f"question has no option list (looked for 'Options: A: ..', '(A) ..' / 'A. ..' lines): "
                         f"{str(row['question'])[:200]!r}")
    question, options = found
    return make_item(row_id(row, "index"), question, [open_image(row.get("image"), base)], options,
                     str(row["answer"]).strip(), "mcq", needs_image=True)


def convert_mathvista(row, base):  # AI4Math/MathVista: multiple-choice gold is the option *text*
    image = open_image(row.get("decoded_image") or row.get("image"), base)
    if row.get("question_type") == "multi_choice" and row.get("choices"):
        options = lettered(row["choices"])
        return make_item(row_id(row, "pid"), row["question"], [image], options,
                         letter_of(options, row["answer"]), "mcq", needs_image=True)
    question = row["question"]
    if row.get("answer_type") == "integer":
        question += "\n(Answer with an integer.)"
    elif row.get("answer_type") == "float" and row.get("precision") is not None:
        question += f"\n(Answer with a number to {int(row['precision'])} decimal places.)"
    return make_item(row_id(row, "pid"), question, [image], None, str(row["answer"]), "math", needs_image=True)


def convert_mathvision(row, base):  # MathLLMs/MathVision: `<image1>` placeholder, options [] for open
    question = re.sub(r"<image(\d+)>", r"<image \1>", str(row["question"]))
    image = open_image(row.get("decoded_image") or row.get("image"), base)
    if row.get("options"):
        return make_item(row_id(row, "id"), question, [image], lettered(row["options"]),
                         str(row["answer"]).strip(), "mcq", needs_image=True)
    return make_item(row_id(row, "id"), question, [image], None, str(row["answer"]), "math", needs_image=True)


def convert_medqa(row, base):  # MedQA: options {A: ..} (4-option set) or [{key, value}] (bigbio source)
    opts = row["options"]
    options = ({o["key"]: str(o["value"]) for o in opts} if isinstance(opts, list) else
               {k: str(v) for k, v in opts.items() if v is not None})
    gold = row.get("answer_idx") or letter_of(options, row["answer"])
    return make_item(row_id(row, "id"), row["question"], [], options, gold, "mcq")


def convert_medxpertqa(row, base):  # TsinghuaC3I/MedXpertQA: options already inside the question text
    question = re.split(r"\n?\s*Answer Choices:", str(row["question"]))[0].strip()
    images = [open_image(name, base) for name in (row.get("images") or [])]
    if row.get("options"):
        options = {k: str(v) for k, v in row["options"].items() if v is not None}
    else:  # only the "Answer Choices: (A) .. (B) .." text
        options = (inline_options(row["question"]) or (None, None))[1]
        if not options:
            raise ValueError("no `options` field and no 'Answer Choices:' list in the question")
    return make_item(row_id(row, "id"), question, images, options, str(row["label"]).strip(), "mcq")


def nejm_image(row, base):
    """NEJM's image: an `image` / `image_path` / `img` column, else the file named by the item's date id
    (IC20230105.jpg, 20230105.png, ...) in --nejm_image_dir or the data's images/ folder; None if absent."""
    for key in ("image", "image_path", "img"):
        if row.get(key) not in (None, ""):
            return row[key]
    ids = [str(row[k]) for k in ("date", "id", "question_id") if row.get(k) not in (None, "")]
    dates = [m.group(1) for v in ids for m in [re.search(r"(\d{8})", v)] if m]
    for folder in [d for d in (row.get("_image_dir"), os.path.join(base, "images"), base) if d]:
        for date in dates:
            for name in (f"IC{date}", date):
                for ext in (".jpg", ".jpeg", ".png", ".webp"):
                    if os.path.isfile(os.path.join(folder, name + ext)):
                        return os.path.join(folder, name + ext)
    return None


def convert_option_columns(row, base):  # OmniMedVQA / NEJM dumps: option_A.. columns
    options = {L: str(row[f"option_{L}"]) for L in LETTERS[:10] if row.get(f"option_{L}") not in (None, "")}
    if row.get("gt_answer") is not None:  # OmniMedVQA: gold is the option text
        gold = letter_of(options, row["gt_answer"])
        image = row.get("image_path") or row.get("image")
    else:  # NEJM: a letter; public dumps serve the image by date, not in a column
        gold = str(row.get("correct_answer") or row.get("answer")).strip()
        image = nejm_image(row, base)
    return make_item(row_id(row, "question_id", "id", "date"), row["question"],
                     [open_image(image, base)], options, gold, "mcq", needs_image=True)


def convert_math500(row, base):  # HuggingFaceH4/MATH-500: problem, answer
    return make_item(row_id(row, "unique_id"), row["problem"], [], None, str(row["answer"]), "math")


def convert_gpqa(row, base):  # Idavidrein/gpqa: one correct and three incorrect answers, shuffled per item
    id = row_id(row, "Record ID")
    texts = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
    order = list(range(4))
    random.Random(int(hashlib.md5(id.encode()).hexdigest(), 16)).shuffle(order)  # same order every run
    options = lettered(texts[i] for i in order)
    return make_item(id, row["Question"], [], options, LETTERS[order.index(0)], "mcq")


def mmmu_subject(row) -> str:
    """MMMU rows carry their subject only in the hub config or the id ("validation_Clinical_Medicine_3")."""
    if row.get("subject"):
        return str(row["subject"]).replace(" ", "_")
    if row.get("_config"):
        return row["_config"]
    return re.sub(r"^(validation|test|dev)_|_\d+$", "", str(row.get("id", "")))


@dataclass
class Benchmark:
    hub_id: str | None  # None: no canonical hub copy, read from --data_dir
    configs: list  # hub configs, concatenated (None: the default config, "all": every config)
    split: str
    convert: Callable  # (raw row, folder of the data file) -> item
    parent: str | None = None  # subsets read their parent's data and filter it
    keep: Callable | None = None  # raw row -> bool (the subset's filter)


REGISTRY = {
    "gsm8k": Benchmark("openai/gsm8k", ["main"], "test", convert_gsm8k),
    "mmlu_pro": Benchmark("TIGER-Lab/MMLU-Pro", [None], "test", convert_mmlu_pro),
    "mmlu_pro_health": Benchmark("TIGER-Lab/MMLU-Pro", [None], "test", convert_mmlu_pro, parent="mmlu_pro",
                                 keep=lambda r: r.get("category") == "health"),
    "mmmu_val": Benchmark("MMMU/MMMU", ["all"], "validation", convert_mmmu),  # its 30 subject configs
    "mmmu_health": Benchmark("MMMU/MMMU", sorted(HEALTH_SUBJECTS), "validation", convert_mmmu, parent="mmmu_val",
                             keep=lambda r: mmmu_subject(r) in HEALTH_SUBJECTS),
    "mmmu_pro_standard": Benchmark("MMMU/MMMU_Pro", ["standard (10 options)"], "test", convert_mmmu),
    "mmmu_pro_vision": Benchmark("MMMU/MMMU_Pro", ["vision"], "test", convert_mmmu_pro_vision),
    "mmmu_pro_health": Benchmark("MMMU/MMMU_Pro", ["standard (10 options)"], "test", convert_mmmu,
                                 parent="mmmu_pro_standard", keep=lambda r: mmmu_subject(r) in HEALTH_SUBJECTS),
    "mmstar": Benchmark("Lin-Chen/MMStar", [None], "val", convert_mmstar),
    "mathvista_testmini": Benchmark("AI4Math/MathVista", [None], "testmini", convert_mathvista),
    "mathvision": Benchmark("MathLLMs/MathVision", [None], "test", convert_mathvision),
    # The 5-option MedQA (US) test set; the hub copy is a script dataset, so usually read from --data_dir.
    "medqa": Benchmark("bigbio/med_qa", ["med_qa_en_source"], "test", convert_medqa),
    "medqa_4opt": Benchmark("GBaker/MedQA-USMLE-4-options", [None], "test", convert_medqa),
    "medxpertqa_mm": Benchmark("TsinghuaC3I/MedXpertQA", ["MM"], "test", convert_medxpertqa),
    "medxpertqa_text": Benchmark("TsinghuaC3I/MedXpertQA", ["Text"], "test", convert_medxpertqa),
    # OmniMedVQA ships as a zip (QA_information/Open-access/*.json + images); the paper used 1000 of its items.
    "omnimedvqa": Benchmark(None, [None], "test", convert_option_columns),
    "nejm": Benchmark(None, [None], "test", convert_option_columns),  # community JSON dumps only
    "math500": Benchmark("HuggingFaceH4/MATH-500", [None], "test", convert_math500),
    "gpqa_diamond": Benchmark("Idavidrein/gpqa", ["gpqa_diamond"], "train", convert_gpqa),
    "toy_text": Benchmark(None, [None], "test", convert_gsm8k),  # scripts/make_toy_data.py: GSM8K shape
    "toy_image": Benchmark(None, [None], "test", convert_mathvista),  # the same problems drawn, MathVista shape
}


# ---- Loading: a local file/folder (common.load_rows) or the hub ----------------------------------
def load_items(name: str, cfg: Config) -> list[dict]:
    spec = REGISTRY[name]
    if cfg.data_dir:
        names = [name] + ([spec.parent] if spec.parent else [])  # a subset's own file first, then its parent's
        candidates = [os.path.join(cfg.data_dir, n + ext) for n in names for ext in (".jsonl", ".json", ".parquet", "")]
        source = next((p for p in candidates if os.path.exists(p)), None)
        if source is None:
            raise FileNotFoundError(f"{name}: none of {', '.join(candidates)} exists")
        rows, base = common.load_rows(source, spec.split)
    else:
        if spec.hub_id is None:
            raise ValueError(f"{name} has no hub copy: download it and pass --data_dir (see the registry comments)")
        import datasets
        rows, base, source = [], ".", spec.hub_id
        configs = datasets.get_dataset_config_names(spec.hub_id) if spec.configs == ["all"] else spec.configs
        for config in configs:
            ds = datasets.load_dataset(spec.hub_id, config, split=spec.split)
            rows += [dict(r, _config=config) for r in ds]
    rows = [dict(r, _index=i) for i, r in enumerate(rows)]  # the position is the id of rows without one
    if name == "nejm" and cfg.nejm_image_dir:
        rows = [dict(r, _image_dir=cfg.nejm_image_dir) for r in rows]
    if spec.keep:
        rows = [r for r in rows if spec.keep(r)]
    rows = rows[:cfg.limit] if cfg.limit else rows
    items = Items()
    for r in rows:
        try:
            items.append(spec.convert(r, base))
        except SkipItem as e:  # counted in the summary, named here
            items.skipped.append(str(e))
        except Exception as e:  # name the file, the row and the field the user must fix
            raise ValueError(f"{name}: {source} row {r['_index']}: cannot convert ({type(e).__name__}: {e})") from e
    if items.skipped:
        hint = " (pass --nejm_image_dir)" if name == "nejm" else ""
        print(f"[{name}] skipped {len(items.skipped)} of {len(rows)} items{hint}: " + "; ".join(items.skipped[:5]) +
              (" ..." if len(items.skipped) > 5 else ""), file=sys.stderr)
        if not items:
            raise ValueError(f"{name}: {source}: every item lacks its image{hint}; first: {items.skipped[0]}")
    if len({it["id"] for it in items}) != len(items):
        raise ValueError(f"{name}: {source} has duplicate item ids")
    return items


class Items(list):
    """A benchmark's items, with `skipped`: the items the data could not pose (named, counted in the summary)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.skipped = []


def max_images(items) -> int:
    """The most images one prompt of these items carries (each image once): the engine's per-prompt limit."""
    return max((len(it["images"]) for it in items), default=0)


# ---- Prompts: rewards.py's prompt, images placed where their `<image k>` placeholders are ---------
def fit_pixels(image, max_pixels: int):
    """Downscale an image to at most max_pixels pixels, keeping its aspect ratio."""
    w, h = image.size
    if max_pixels and w * h > max_pixels:
        s = (max_pixels / (w * h)) ** 0.5
        image = image.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BICUBIC)
    return image


def build_prompt(item: dict, processor, with_images: bool = True, max_pixels: int = 0, template: str = "paper") -> dict:
    """{"prompt": chat-templated text, "images": [...]} for generate(). Each image once, at its first
    `<image k>` placeholder (MMMU interleaves them; an MMMU-Pro item may mention its 7 images 35 times): a
    later mention is the text "[image k]", so a prompt never carries more images than the item has. Images
    without a placeholder go first. Without images (a text model, or the text-solvable analysis) the
    placeholders are dropped."""
    if item["kind"] == "mcq":
        options = ({k: "(shown in the image)" for k in item["options"]} if item.get("options_in_image")
                   else item["options"])
        text = rewards.pose(item["question"], options, template)
    else:
        text = rewards.pose(item["question"], None, template, kind="math")
    images = [fit_pixels(im, max_pixels) for im in item["images"]] if with_images else []
    content, used, referenced = [], [], set()
    for j, part in enumerate(re.split(r"<image (\d+)>", text)):
        if j % 2 == 0:
            if part.strip():
                content.append({"type": "text", "text": part})
        elif 1 <= int(part) <= len(images) and int(part) - 1 not in referenced:
            content.append({"type": "image"})
            used.append(images[int(part) - 1])
            referenced.add(int(part) - 1)
        elif 1 <= int(part) <= len(images):
            content.append({"type": "text", "text": f"[image {part}]"})
    unplaced = [im for k, im in enumerate(images) if k not in referenced]
    content = [{"type": "image"} for _ in unplaced] + content
    used = unplaced + used
    if not used:  # a plain string: what text-only chat templates expect
        content = "".join(c["text"] for c in content)
    if processor is None:  # replay backend: no model, no template
        return {"prompt": content if isinstance(content, str) else json.dumps(content), "images": used}
    return {"prompt": chat_prompt(processor, [{"role": "user", "content": content}]), "images": used}


# ---- Metrics: pure functions over the per-item records --------------------------------------------
def majority_correct(votes: list, correct: list) -> float:
    """maj@k: the most common answer (rewards.majority_vote: equal numbers grouped, no-answers ignored,
    ties to the first seen) is right if the sample that first gave it is right."""
    winner = rewards.majority_vote(votes)
    return 0.0 if winner is None else float(correct[votes.index(winner)] or 0.0)


def extraction_rule(text: str, options) -> str:
    """How rewards.py read a response (lenient, as scored): "tag", "boxed", "cue", ... or "none"."""
    answer, rule = (rewards.extract_choice_rule(text, options, lenient=True) if options else
                    rewards.extract(text, lenient=True))
    return "none" if answer is None else rule


def summarize(records: list[dict], num_samples: int) -> dict:
    """Accuracy (first sample: the greedy headline), avg/maj/pass@k, parse failures, lengths, truncation, and
    how each answer was read: `extraction_rules` counts samples per rule ("none" = parse failure),
    `lenient_rate` the share read by a lenient fallback (rewards.LENIENT_RULES: not the taught format),
    `accuracy_lenient_share` the share of first-sample points that came from those fallbacks."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    scored = [r for r in records if r["correct"][0] is not None]  # gold unparseable: skipped, counted
    samples = [(r, j) for r in records for j in range(len(r["responses"]))]
    failed = lambda r, j: r["extraction_rule"][j] == "none" if "extraction_rule" in r else r["extracted"][j] is None
    s = {"items": len(records), "scored": len(scored), "gold_unparseable": len(records) - len(scored),
         "accuracy": mean([r["correct"][0] for r in scored]),
         "parse_failure_rate": mean([failed(r, j) for r, j in samples]),
         "mean_tokens": mean([r["tokens"][j] for r, j in samples]),
         "truncation_rate": mean([r["truncated"][j] for r, j in samples]),
         "forced_exit_rate": mean([r["forced_exit"][j] for r, j in samples])}
    if num_samples > 1:
        s[f"avg@{num_samples}"] = mean([mean(r["correct"]) for r in scored])
        s[f"maj@{num_samples}"] = mean([majority_correct(r.get("choice") or r["extracted"], r["correct"])
                                       for r in scored])
        s[f"pass@{num_samples}"] = mean([max(r["correct"]) for r in scored])
    with_image = [r for r in scored if r.get("noimage_correct") is not None]
    if with_image:  # the paper's text-solvable-removed accuracy: only items the model fails without the image
        rest = [r for r in with_image if not r["noimage_correct"][0]]
        s.update(text_solvable=len(with_image) - len(rest), text_solvable_removed_items=len(rest),
                 text_solvable_removed_accuracy=mean([r["correct"][0] for r in rest]))
    if all("extraction_rule" in r for r in records) and records:
        rules = Counter(r["extraction_rule"][j] for r, j in samples)
        lenient = lambda rule: rule in rewards.LENIENT_RULES
        points = [r for r in scored if r["correct"][0]]
        s.update(extraction_rules=dict(rules.most_common()),
                 lenient_rate=mean([lenient(r["extraction_rule"][j]) for r, j in samples]),
                 accuracy_lenient_share=mean([lenient(r["extraction_rule"][0]) for r in points]) if points else 0.0)
    return s


def score(texts: list[str], golds: list, options: list) -> list:
    """rewards.accuracy_reward, with a list of accepted golds (MMMU open) scored as the best of them.
    lenient=True: what the harnesses accept (the last number of an unformatted response, ...); each
    sample's rule is recorded (extraction_rule) and tallied in the summary."""
    flat = [(i, t, g, o) for i, (t, gs, o) in enumerate(zip(texts, golds, options))
            for g in (gs if isinstance(gs, list) else [gs])]
    got = rewards.accuracy_reward([t for _, t, _, _ in flat], [g for _, _, g, _ in flat], [o for *_, o in flat],
                                  lenient=True)
    out = [None] * len(texts)
    for (i, *_), v in zip(flat, got):
        if v is not None:
            out[i] = max(out[i] or 0.0, v)
    return out


# ---- Resume: append-only JSONL per benchmark (and engine); a line torn by a kill is cut off ----
def merge_shards(path: str, items: list[dict]) -> dict:
    """Records of a benchmark's JSONL by id, after folding the engines' part files
    (<benchmark>.shard-i-of-N.jsonl) into it in the items' order and cutting a line torn by a kill.
    A kill at any point loses nothing: the parts go only once the JSONL holds them."""
    parts = common.shard_paths(path)
    if not parts:
        return {r["id"]: r for r in common.repair_jsonl(path)}
    records = {r["id"]: r for p in [path] + parts for r in common.read_jsonl(p)[0]}
    position = {it["id"]: p for p, it in enumerate(items)}
    order = sorted(records.values(), key=lambda r: position.get(r["id"], len(position)))
    common.write_jsonl_atomic(path, order)
    for p in parts:
        os.remove(p)
    return records


# ---- Several GPUs: data-parallel engines, each a copy of this script on its own GPUs and items ---


def replay_generate(table: dict, bench: str, items: list, n: int, key: str) -> list[list[Completion]]:
    """Replay backend (tests of scoring only): scripted responses keyed by (benchmark, id). A response is
    a string or {"text", "finish_reason", "forced_exit", "tokens"}; tokens default to the word count."""
    outs = []
    for it in items:
        row = table.get((bench, it["id"])) or table.get((None, it["id"]))
        if row is None or len(row.get(key, [])) < n:
            raise KeyError(f"replay file has no {n} {key!r} for {bench} item {it['id']!r}")
        comps = []
        for r in row[key][:n]:
            r = {"text": r} if isinstance(r, str) else r
            comps.append(Completion(text=r["text"], token_ids=[0] * r.get("tokens", len(r["text"].split())),
                                    finish_reason=r.get("finish_reason", "stop"),
                                    forced_exit=r.get("forced_exit", False)))
        outs.append(comps)
    return outs


def score_chunk(items: list, prompts: list, outs: list, blind_outs: dict, k: int) -> list[dict]:
    """Per-item records: responses, extracted answers (None = parse failure), correctness, lengths,
    truncation, forced exit; for multiple choice the letter each sample picks (what maj@k votes on)."""
    rep = lambda xs: [x for x in xs for _ in range(k)]  # per item -> per sample
    correct = score([c.text for cs in outs for c in cs], rep([it["gold"] for it in items]),
                    rep([it["options"] for it in items]))
    blind = sorted(blind_outs)
    bcorrect = score([c.text for i in blind for c in blind_outs[i]], rep([items[i]["gold"] for i in blind]),
                     rep([items[i]["options"] for i in blind])) if blind else []
    records = []
    for i, (it, p, cs) in enumerate(zip(items, prompts, outs)):
        rec = {"id": it["id"], "kind": it["kind"], "gold": it["gold"], "options": it["options"],
               "prompt": p["prompt"], "n_images": len(p["images"]), "responses": [c.text for c in cs],
               "extracted": [rewards.extract_answer(c.text, lenient=True) for c in cs],
               "extraction_rule": [extraction_rule(c.text, it["options"]) for c in cs], "correct": correct[i * k:(i + 1) * k],
               "tokens": [len(c.token_ids) for c in cs], "truncated": [c.finish_reason == "length" for c in cs],
               "forced_exit": [c.forced_exit for c in cs]}
        if it["options"]:
            rec["choice"] = [rewards.extract_choice(c.text, it["options"], lenient=True) for c in cs]
        if i in blind_outs:
            b = blind.index(i)
            rec.update(noimage_responses=[c.text for c in blind_outs[i]], noimage_correct=bcorrect[b * k:(b + 1) * k])
        records.append(rec)
    return records


def markdown_table(header: list, rows: list) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def write_reports(summary: dict, out_dir: str, k: int) -> str:
    """summary.json (written atomically) and results.md: one row per benchmark, percentages."""
    with open(os.path.join(out_dir, "summary.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(out_dir, "summary.json.tmp"), os.path.join(out_dir, "summary.json"))
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    at_k = [f"avg@{k}", f"maj@{k}", f"pass@{k}"] if k > 1 else []
    rows = [[name, s["items"], pct(s["accuracy"])] + [pct(s.get(m)) for m in at_k] +
            [pct(s["parse_failure_rate"]), pct(s.get("lenient_rate")), s.get("skipped", 0),
             "-" if s["mean_tokens"] is None else f"{s['mean_tokens']:.0f}",
             pct(s["truncation_rate"]), pct(s["forced_exit_rate"]),
             f"{pct(s['text_solvable_removed_accuracy'])} ({s['text_solvable_removed_items']} items)"
             if "text_solvable_removed_accuracy" in s else "-"] for name, s in summary["benchmarks"].items()]
    table = markdown_table(["benchmark", "items", "accuracy"] + at_k +
                           ["parse fail %", "lenient %", "skipped", "mean tokens", "truncated %", "forced exit %",
                            "text-solvable removed"], rows)
    rules = [f"- {name}: " + ", ".join(f"{r} {n}" for r, n in s["extraction_rules"].items())
             for name, s in summary["benchmarks"].items() if s.get("extraction_rules")]
    if rules:  # how much of each score came from the taught format, and how much from lenient fallbacks
        table += ("\nAnswers read by rule (samples; lenient: " + ", ".join(rewards.LENIENT_RULES) + "):\n" +
                  "\n".join(rules) + "\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# {summary['config']['model_name_or_path'] or summary['config']['backend']}\n\n{table}")
    return table


def compare_runs(run_dirs: list[str], out_dir: str) -> str:
    """Side-by-side accuracy (%) of several runs: compare.md and a grouped bar chart compare.png."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    names = names if len(set(names)) == len(names) else run_dirs  # runs/a/eval vs runs/b/eval: full paths
    runs = {}
    for name, d in zip(names, run_dirs):
        with open(os.path.join(d, "summary.json")) as f:
            runs[name] = json.load(f)["benchmarks"]
    benches = list(dict.fromkeys(b for r in runs.values() for b in r))
    acc = {n: [(r.get(b) or {}).get("accuracy") for b in benches] for n, r in runs.items()}
    table = markdown_table(["benchmark"] + names, [[b] + ["-" if acc[n][i] is None else f"{100 * acc[n][i]:.1f}"
                                                         for n in names] for i, b in enumerate(benches)])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no compare.png", file=sys.stderr)
        return table
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(benches) * len(runs)), 4))
    width = 0.8 / len(runs)
    for j, n in enumerate(names):
        ax.bar([i + j * width for i in range(len(benches))], [100 * (v or 0) for v in acc[n]], width, label=n)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(benches))], benches, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))  # outside the bars
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "compare.png"), dpi=120)
    plt.close(fig)
    return table


def main(cfg: Config):
    if cfg.compare:
        print(compare_runs(cfg.compare, cfg.output_dir))
        return
    benchmarks = [b for arg in cfg.benchmarks for b in arg.replace(",", " ").split()]
    unknown = [b for b in benchmarks if b not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(REGISTRY)}")
    if cfg.num_samples > 1 and cfg.temperature == 0:
        raise ValueError("--num_samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    think_budget = cfg.think_budget or None  # 0 turns forced exit off
    os.makedirs(cfg.output_dir, exist_ok=True)

    # ---- 1. Engine: in this process (loaded once there is work), or --num_engines copies of this
    # script (data parallel), each on its own GPUs and block of items; their parts are merged in 2.
    if cfg.backend != "replay" and not cfg.model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    if cfg.num_engines > 1 and cfg.shard:
        raise ValueError("--num_engines starts the engines, each on its own --shard: not both")
    if cfg.backend == "vllm":
        common.check_tensor_parallel(cfg.model_name_or_path, cfg.vllm_tensor_parallel_size)
    engine, processor, scripted = None, None, {}
    if cfg.num_engines > 1:
        common.run_engines(cfg, main, log_prefix=os.path.join(cfg.output_dir, ""))
    elif cfg.backend == "replay":
        with open(cfg.replay_file) as f:
            for row in map(json.loads, filter(str.strip, f)):
                scripted[(row.get("benchmark"), str(row["id"]))] = row

    def sample(bench, items, prompts, key, seed):
        if cfg.backend == "replay":
            return replay_generate(scripted, bench, items, cfg.num_samples, key)
        return generate(engine, prompts, n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens, think_budget=think_budget, seed=seed,
                        batch_size=cfg.generation_batch_size)

    summary = {"config": asdict(cfg), "benchmarks": {}}
    if os.path.exists(os.path.join(cfg.output_dir, "summary.json")):  # benchmarks run earlier into this folder
        with open(os.path.join(cfg.output_dir, "summary.json")) as f:
            summary["benchmarks"] = json.load(f)["benchmarks"]
    table = ""
    # vLLM's per-prompt image limit must fit the largest item of these benchmarks (a pass over the data)
    image_limit = max([max_images(load_items(b, cfg)) for b in benchmarks] + [1]) \
        if cfg.backend == "vllm" and cfg.num_engines == 1 else 8
    for bench in benchmarks:
        # ---- 2. Data: convert, then skip what an earlier run already finished -------------------------
        items = load_items(bench, cfg)
        path = os.path.join(cfg.output_dir, f"{bench}.jsonl")
        if cfg.shard:  # an engine: its own part file, plus what the JSONL already holds (read only)
            part = common.shard_path(path, cfg.shard)
            done = {r["id"]: r for r in common.read_jsonl(path)[0]}
            done.update({r["id"]: r for r in common.repair_jsonl(part)})
        else:
            part, done = path, merge_shards(path, items)
        if any(len(r["responses"]) != cfg.num_samples for r in done.values()):
            raise ValueError(f"{path} was written with another --num_samples; use a new --output_dir")
        lo, hi = common.shard_bounds(cfg.shard, len(items))
        todo = [it for it in items[lo:hi] if it["id"] not in done]
        position = {it["id"]: p for p, it in enumerate(items)}
        if todo and engine is None and cfg.backend != "replay":
            engine = load_engine(cfg.model_name_or_path, cfg.backend,
                                 tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                                 gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                 max_model_len=cfg.vllm_max_model_len, seed=cfg.seed,
                                 kv_cache_memory_bytes=cfg.vllm_kv_cache_memory_bytes,
                                 max_images_per_prompt=image_limit)
            processor = engine.processor
        vlm = engine is None or engine.is_vlm
        if not vlm and any(it["images"] for it in todo):
            print(f"[{bench}] text-only model: images are dropped (no text-solvable analysis)", file=sys.stderr)
        bar = tqdm(total=hi - lo, initial=hi - lo - len(todo), desc=bench, dynamic_ncols=True)
        with open(part, "a", encoding="utf-8") as out:
            for start in range(0, len(todo), cfg.items_per_call):
                chunk = todo[start:start + cfg.items_per_call]
                # ---- 3. Generate: k samples per item (forced exit inside generate) ------------------------
                prompts = [build_prompt(it, processor, vlm, cfg.max_pixels, cfg.prompt_template) for it in chunk]
                # Item p's samples use seeds seed + p * k + j: a resumed run (whole batches were written)
                # draws the same samples as an uninterrupted one.
                seed = cfg.seed + position[chunk[0]["id"]] * cfg.num_samples
                outs = sample(bench, chunk, prompts, "responses", seed)
                # ---- 4. Text-solvable analysis: the image items once more, without their images ---------
                blind = [i for i, it in enumerate(chunk) if it["images"]] if cfg.text_solvable_removed and vlm else []
                blind_outs = dict(zip(blind, sample(bench, [chunk[i] for i in blind],
                                                    [build_prompt(chunk[i], processor, False, template=cfg.prompt_template) for i in blind],
                                                    "noimage_responses", seed + 10**6))) if blind else {}
                # ---- 5. Score with rewards.py; one JSONL line per item --------------------------------------
                lines = [json.dumps(rec, ensure_ascii=False) + "\n"
                         for rec in score_chunk(chunk, prompts, outs, blind_outs, cfg.num_samples)]
                # ---- 6. Append, then flush + fsync: what resume relies on ----------------------------------
                out.write("".join(lines))
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(chunk))
        bar.close()
        if cfg.shard:
            continue  # the run that merges the engines' parts summarizes
        # ---- 7. Summarize from the file, in the data's order, so a resumed run reports the same --------
        done = {r["id"]: r for r in common.read_jsonl(path)[0]}
        records = [done[it["id"]] for it in items if it["id"] in done]
        summary["benchmarks"][bench] = dict(summarize(records, cfg.num_samples), skipped=len(items.skipped),
                                            skipped_items=items.skipped)
        table = write_reports(summary, cfg.output_dir, cfg.num_samples)  # after each benchmark: partial results
    print(table)


if __name__ == "__main__":
    main(common.parse_config(Config, __doc__))
