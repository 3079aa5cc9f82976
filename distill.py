r"""Distillation by rejection sampling: long chains of thought from a teacher, kept only when the
answer verifies. X-Reasoner-Med's SFT data is QwQ-32B's reasoning on MedQA, kept when it is right.

    # local teacher on GPUs (vLLM): one engine of 4 GPUs; on 8 GPUs add --num_engines 2
    python distill.py --teacher Qwen/QwQ-32B --dataset GBaker/MedQA-USMLE-4-options \
        --dataset_split train --output data/medqa_qwq32b.jsonl --vllm_tensor_parallel_size 4
    # any OpenAI-compatible server (`vllm serve Qwen/QwQ-32B`, a hosted API, ...)
    OPENAI_API_KEY=... python distill.py --backend openai --base_url http://127.0.0.1:8000/v1 \
        --teacher Qwen/QwQ-32B --dataset medqa_train.jsonl --output data/medqa_qwq32b.jsonl

Per question: `num_samples` teacher samples -> each normalized to the paper's format
`<think>\n...\n</think>\n<answer>...</answer>` -> verified with rewards.accuracy_reward -> up to `keep`
verified samples written as sft.py rows: {"messages": [user: training prompt, assistant: response],
plus teacher, question id, pass rate and token counts}.

Resumable: rows are appended (flush + fsync) and then one record per finished question goes to
`<output>.done`. A restart drops a torn last line and any rows whose question has no done record, then
skips the finished questions: nothing is duplicated, nothing finished is lost, even after SIGKILL.
At the end, statistics are printed and saved to `<output>.stats.json` (they cover resumed work too).

Several GPUs: `--num_engines N` starts N copies of this script, each with its own
`--vllm_tensor_parallel_size` GPUs and `--shard i/N`, the i-th contiguous block of the questions;
each writes resumable part files (data/x.shard-i-of-N.jsonl, its .done, a log), which are then
merged into the output in question order. Question p's samples keep their seeds, so the rows equal
one engine's (vLLM: per-request seeds; hf: when each `generate` call holds one question,
`--items_per_call 1`).
`--shard i/N` also runs one block by hand (another node); a later run without it merges the parts.

The OpenAI-compatible client is plain `urllib` (no extra dependency): one request per sample (so usage
counts are per sample and servers without `n` work), a thread pool bounds the concurrency, each request
has a timeout and is retried with exponential back-off and jitter on connection errors, 408/429/5xx.
A question whose requests still fail is not marked done: rerun the command to retry it.
"""

import collections
import hashlib
import json
import os
import random
import re
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

from tqdm import tqdm

import common
import rewards


@dataclass
class Config:
    # teacher and data
    teacher: str = field(
        default="Qwen/QwQ-32B",
        metadata={"help": "teacher: hub id or folder (vllm, hf), or the served "
                          "model name (openai) (paper, X-Reasoner-Med: QwQ-32B)"},
    )
    dataset: str = field(
        default="GBaker/MedQA-USMLE-4-options",
        metadata={"help": "questions with gold answers: hub id, or a local "
                          ".jsonl/.json/.parquet/.csv file or save_to_disk folder (paper: MedQA)"},
    )
    dataset_config: str = field(
        default="",
        metadata={"help": "hub dataset config name, if it has several"},
    )
    dataset_split: str = field(
        default="train",
        metadata={"help": "split to distill, for hub ids and save_to_disk folders (paper: train)"},
    )
    limit: int = field(
        default=0,
        metadata={"help": "distill only the first N questions (after "
                          "de-duplication / decontamination); 0 = all"},
    )
    output: str = field(
        default="data/distill.jsonl",
        metadata={"help": "output JSONL (sft.py rows), with <output>.done "
                          "and <output>.stats.json next to it"},
    )
    # sampling and rejection
    num_samples: int = field(
        default=4,
        metadata={"help": "teacher samples per question (paper: not stated)"},
    )
    keep: int = field(
        default=1,
        metadata={"help": "keep at most this many verified samples per question "
                          "(paper: rejection sampling, counts not stated)"},
    )
    prompt_template: Literal["paper", "plain"] = field(
        default="paper",
        metadata={"help": "'paper': the paper's training / MCQ prompt; 'plain': "
                          "the question alone (for tiny toy models, which cannot "
                          "find a problem behind the paper's long instructions)"},
    )
    max_new_tokens: int = field(
        default=4096,
        metadata={"help": "teacher response cap in tokens; truncated samples "
                          "are rejected (paper: SFT and RL use 4096)"},
    )
    temperature: float = field(
        default=0.6,
        metadata={"help": "sampling temperature (paper: not stated; QwQ-32B's model card: 0.6)"},
    )
    top_p: float = field(
        default=0.95,
        metadata={"help": "nucleus sampling (paper: not stated; QwQ-32B's model card: 0.95)"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "sampling seed: question p, sample j uses seed + p * num_samples + j "
                          "(hf: one seed per call; openai: per request, if the server honors it)"},
    )
    # de-duplication and decontamination
    dedup: bool = field(
        default=True,
        metadata={"help": "drop repeated questions (same normalized "
                          "text and options), keeping the first one"},
    )
    decontaminate: list[str] = field(
        default_factory=list,
        metadata={"help": "evaluation sets whose questions must not leak into training: "
                          "local files, or hub ids as id:split (split defaults to test)"},
    )
    ngram: int = field(
        default=13,
        metadata={"help": "decontamination: a question is dropped if it "
                          "shares a word n-gram with an evaluation question"},
    )
    # generation backend
    backend: Literal["vllm", "hf", "openai"] = field(
        default="vllm",
        metadata={"help": "teacher backend: vllm (local engine), hf "
                          "(transformers; CPU/tests), openai (HTTP server)"},
    )
    items_per_call: int = field(
        default=64,
        metadata={"help": "questions per generate() call (vllm, hf) or "
                          "in flight (openai): the work a kill can lose"},
    )
    generation_batch_size: int = field(
        default=64,
        metadata={"help": "hf backend: sequences per `generate` call"},
    )
    num_engines: int = field(
        default=1,
        metadata={"help": "data parallel (vllm, hf): this many engines, each on its "
                          "own vllm_tensor_parallel_size GPUs (hf: one) and its own "
                          "block of questions; 8 GPUs, QwQ-32B: 2 engines x 4"},
    )
    shard: str = field(
        default="",
        metadata={"help": "'i/N': distill only the i-th of N contiguous blocks of "
                          "the questions, into part files (set by --num_engines; "
                          "by hand: other nodes); '': all of them"},
    )
    vllm_tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "vllm backend: GPUs per engine; must divide the attention "
                          "heads (QwQ-32B, 40 heads, bf16: 2-4 80 GB GPUs)"},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9,
        metadata={"help": "vllm backend: fraction of GPU memory for weights + KV cache"},
    )
    vllm_max_model_len: int | None = field(
        default=None,
        metadata={"help": "vllm backend: context length (None: the model's)"},
    )
    vllm_kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={"help": "vllm backend: KV cache size, overrides the fraction (CPU: 268435456)"},
    )
    base_url: str = field(
        default="http://127.0.0.1:8000/v1",
        metadata={"help": "openai backend: server root (`vllm serve` listens on :8000/v1)"},
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "openai backend: the environment variable "
                          "that holds the API key (unset: none)"},
    )
    concurrency: int = field(
        default=32,
        metadata={"help": "openai backend: requests in flight at once"},
    )
    request_timeout: float = field(
        default=600.0,
        metadata={"help": "openai backend: seconds per request before it is retried"},
    )
    max_retries: int = field(
        default=5,
        metadata={"help": "openai backend: retries per request (back-off "
                          "1, 2, 4, ... s, capped at 60, +-50%% jitter)"},
    )


# ---------------------------------------------------------------------------------------------------
# Questions: every supported input shape -> {"id", "question", "gold", "options"}
# ---------------------------------------------------------------------------------------------------
def normalize_question(row, i: int, source: str) -> dict:
    """One input row -> {"id", "question", "gold", "options"} (options: dict letter -> text, or None).

    Shapes: Orz-math-57k pairs [{from: human, value}, {from: assistant, ground_truth: {value}}];
    MedQA {question, options: {A: ..}, answer_idx}; MMLU-Pro {question, options: [..], answer: letter};
    plain {question | problem, answer} (a GSM8K answer keeps what follows `####`).
    """
    where = f"{source} row {i}"
    if isinstance(row, list):  # Orz-math-57k: [human turn, assistant turn with the ground truth]
        try:
            question, gold = row[0]["value"], row[1]["ground_truth"]["value"]
        except (IndexError, KeyError, TypeError):
            raise ValueError(f"{where}: expected an Orz-style pair [{{from: human, value}}, "
                             f"{{from: assistant, ground_truth: {{value}}}}]") from None
        return {"id": str(i), "question": question, "gold": str(gold), "options": None}
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object or an Orz-style pair, got {type(row).__name__}")
    question = row.get("question", row.get("problem"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: no 'question' (or 'problem') text field")
    qid = str(row.get("id", row.get("question_id", row.get("pid", i))))
    options = row.get("options")
    if isinstance(options, list):  # MMLU-Pro pads with "N/A" options at the end: drop them
        while options and options[-1] in ("N/A", None, ""):
            options = options[:-1]
        options = {rewards.LETTERS[k]: str(o) for k, o in enumerate(options)}
    elif isinstance(options, dict):
        options = {str(k).strip(): str(v) for k, v in options.items()}
    elif options is not None:
        raise ValueError(f"{where}: field 'options' must be a list or a dict letter -> text")
    if options:
        gold = row.get("answer_idx", row.get("answer"))  # MedQA: answer_idx; MMLU-Pro: answer (a letter)
        if gold is None or str(gold).strip() not in options:
            raise ValueError(f"{where}: field 'answer_idx' / 'answer' must be one of the option letters "
                             f"{sorted(options)}, got {gold!r}")
        return {"id": qid, "question": question, "gold": str(gold).strip(), "options": options}
    gold = row.get("answer", row.get("solution"))
    if gold is None:
        raise ValueError(f"{where}: no 'answer' field")
    gold = rewards.final_answer(gold)  # GSM8K: worked solution, then "#### 42"
    return {"id": qid, "question": question, "gold": gold, "options": None}


def user_prompt(q: dict, template: str = "paper") -> str:
    """The paper's training prompt (multiple choice: its MCQ prompt; or the plain question): the user turn of the SFT row."""
    return rewards.pose(q["question"], q["options"], template, kind="train")


# ---------------------------------------------------------------------------------------------------
# De-duplication and decontamination (pure)
# ---------------------------------------------------------------------------------------------------
def normalize_text(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped: the unit of comparison for dedup and n-gram overlap."""
    return re.findall(r"[a-z0-9]+", text.lower())


def question_key(q: dict) -> str:
    """Hash of the normalized question text and options: equal keys = the same question."""
    text = " ".join(normalize_text(q["question"]))
    if q["options"]:
        text += " || " + " | ".join(" ".join(normalize_text(v)) for _, v in sorted(q["options"].items()))
    return hashlib.sha1(text.encode()).hexdigest()


def ngrams(text: str, n: int) -> set[str]:
    """Word n-grams of a text; a text shorter than n words is one 'n-gram' (then only exact matches count)."""
    words = normalize_text(text)
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[k:k + n]) for k in range(len(words) - n + 1)}


def eval_question_texts(row) -> list[str]:
    """The question text of an evaluation row, whatever its benchmark's shape (question/problem/query)."""
    if isinstance(row, list):  # Orz-style pair
        return [row[0].get("value", "")] if row and isinstance(row[0], dict) else []
    return [row[k] for k in ("question", "problem", "query") if isinstance(row.get(k), str)][:1]


# ---------------------------------------------------------------------------------------------------
# Teacher output -> the paper's format (pure)
# ---------------------------------------------------------------------------------------------------
def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, solution) from a teacher response. Knows `<think>..</think>` (R1, QwQ; also when the
    chat template already opened `<think>`, so only `</think>` is generated) and OpenThoughts'
    `<|begin_of_thought|>..<|end_of_thought|>`. No marker: (None, text)."""
    m = re.search(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>(.*)", text, re.S)
    if m:
        solution = re.sub(r"<\|(begin|end)_of_solution\|>", "", m.group(2))
        return m.group(1).strip(), solution.strip()
    if rewards.THINK_END in text:
        thinking, solution = text.split(rewards.THINK_END, 1)  # the first `</think>` closes the thinking
        return thinking.split(rewards.THINK_START, 1)[-1].strip(), solution.strip()
    return None, text.strip()


def normalize_response(text: str, options: dict | None) -> str | None:
    """A teacher response in the paper's format `<think>\\n..\\n</think>\\n<answer>..</answer>`, or None
    when it has no thinking, no extractable answer, or stray tags. The answer tag holds only the final answer (the
    teacher's post-thinking write-up is dropped); a chosen option becomes "C: option text", as in the
    paper's MCQ example."""
    thinking, solution = split_thinking(text)
    if not thinking:
        return None
    answer = rewards.extract_answer(solution)
    if answer is None or not answer.strip():
        return None
    letter = rewards.match_choice(answer, options) if options else None
    if letter is not None:  # "C", "(C)", "option C" or C's text -> "C: text"
        answer = f"{letter}: {options[letter]}"
    response = rewards.format_response(thinking, answer)
    return response if rewards.format_reward([response]) == [1.0] else None  # e.g. tags inside the thinking


# ---------------------------------------------------------------------------------------------------
# Teachers: per question, num_samples dicts {text, finish_reason, prompt_tokens, completion_tokens}
# (None for a request that failed for good)
# ---------------------------------------------------------------------------------------------------
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def backoff_seconds(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential back-off with +-50% jitter (so many clients do not retry in lockstep)."""
    return min(cap, base * 2 ** attempt) * random.uniform(0.5, 1.5)


def openai_chat(base_url: str, api_key: str, body: dict, timeout: float, max_retries: int) -> dict:
    """POST /chat/completions with retries; returns the decoded JSON reply or raises the last error."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode()
    for attempt in range(max_retries + 1):
        try:
            req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data, headers)
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            if e.code not in RETRY_STATUS or attempt == max_retries:
                raise RuntimeError(f"{base_url}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
            if attempt == max_retries:
                raise
        time.sleep(backoff_seconds(attempt))
    raise AssertionError("unreachable")


def choice_text(choice: dict) -> str:
    """The response text; a server that splits reasoning out (`vllm serve --reasoning-parser ..`) gets
    its reasoning put back inside <think> tags."""
    msg = choice.get("message") or {}
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    content = msg.get("content") or ""
    return f"<think>\n{reasoning}\n</think>\n{content}" if reasoning else content


def make_teacher(cfg: Config):
    """teacher(todo) for the chosen backend: todo = [(position, question)] in order; yields
    (position, question, samples) in the same order. Seeds derive from positions, so a rerun or
    another engine draws the same samples (vllm: question p, sample j gets seed + p * n + j whenever
    a call's questions are consecutive; hf: one seed per call, the same for the same slice)."""
    n = cfg.num_samples
    if cfg.backend == "openai":
        api_key = os.environ.get(cfg.api_key_env, "")
        pool = ThreadPoolExecutor(max_workers=cfg.concurrency)

        def one(q, j, seed):
            body = {"model": cfg.teacher, "messages": [{"role": "user", "content": user_prompt(q, cfg.prompt_template)}],
                    "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                    "seed": seed}
            try:
                reply = openai_chat(cfg.base_url, api_key, body, cfg.request_timeout, cfg.max_retries)
                choice, usage = reply["choices"][0], reply.get("usage") or {}
                return {"text": choice_text(choice), "finish_reason": choice.get("finish_reason") or "stop",
                        "completion_tokens": usage.get("completion_tokens"),
                        "prompt_tokens": usage.get("prompt_tokens")}
            except Exception as e:  # noqa: BLE001: a failed request leaves its question unfinished
                tqdm.write(f"request failed for question {q['id']} sample {j}: {e}")
                return None

        def teacher(todo):
            # A sliding window of questions in flight keeps the pool busy while finished questions
            # are written in order (a slow request delays the writing, not the other requests).
            window = collections.deque()
            for i, q in todo:
                window.append((i, q, [pool.submit(one, q, j, cfg.seed + i * n + j) for j in range(n)]))
                if len(window) >= cfg.items_per_call:
                    i0, q0, futures = window.popleft()
                    yield i0, q0, [f.result() for f in futures]
            for i0, q0, futures in window:
                yield i0, q0, [f.result() for f in futures]
        return teacher

    import generation
    engine = generation.load_engine(
        cfg.teacher, cfg.backend, tensor_parallel_size=cfg.vllm_tensor_parallel_size,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        max_model_len=cfg.vllm_max_model_len, seed=cfg.seed,
        kv_cache_memory_bytes=cfg.vllm_kv_cache_memory_bytes)

    def teacher(todo):
        slices: dict[int, list] = {}  # fixed slices of the question list, so seeds do not shift on resume
        for i, q in todo:
            slices.setdefault(i // cfg.items_per_call, []).append((i, q))
        for _, chunk in sorted(slices.items()):
            texts = [generation.chat_prompt(engine.processor, [{"role": "user", "content": prompt}])
                     for prompt in (user_prompt(q, cfg.prompt_template) for _, q in chunk)]
            outs = generation.generate(engine, [{"prompt": t} for t in texts], n=n,
                                       temperature=cfg.temperature, top_p=cfg.top_p,
                                       max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.generation_batch_size,
                                       seed=cfg.seed + chunk[0][0] * n)  # as openai's: position * n
            for (i, q), t, comps in zip(chunk, texts, outs):
                n_prompt = len(engine.tokenizer(t, add_special_tokens=False)["input_ids"])
                yield i, q, [{"text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": n_prompt,
                              "completion_tokens": len(c.token_ids)} for c in comps]
    return teacher


# ---------------------------------------------------------------------------------------------------
# Resumable output: append + fsync; repair on restart
# ---------------------------------------------------------------------------------------------------
def resume(output: str) -> tuple[dict[str, dict], int]:
    """Done records by question id, after repairing both files; returns (done, rows dropped).
    Rows are written before their question's done record, so rows without one are an unfinished
    question's (the run died between the two writes): they are dropped and the question redone."""
    done_list, torn = common.read_jsonl(output + ".done")
    done = {d["question_id"]: d for d in done_list}
    if torn or len(done) != len(done_list):
        common.write_jsonl_atomic(output + ".done", list(done.values()))
    rows, torn = common.read_jsonl(output)
    seen, good = set(), []
    for r in rows:
        key = (r.get("question_id"), r.get("sample"))
        if key[0] in done and key not in seen:
            seen.add(key)
            good.append(r)
    if torn or len(good) != len(rows):
        common.write_jsonl_atomic(output, good)
    return done, len(rows) - len(good) + int(torn)


def merge_shards(output: str, questions: list[dict]) -> None:
    """Fold the engines' part files (data/x.shard-i-of-N.jsonl and its .done) into the output,
    rows and done records in question order; parts are repaired first: only finished questions move.
    A kill at any point loses nothing: the parts go only once the output holds them."""
    parts = common.shard_paths(output)
    if not parts:
        return
    done, rows = {}, {}
    for path in [output] + parts:
        done.update(resume(path)[0])
        rows.update({(r["question_id"], r["sample"]): r for r in common.read_jsonl(path)[0]})
    position = {q["id"]: p for p, q in enumerate(questions)}
    order = lambda qid: position.get(qid, len(position))  # noqa: E731
    rows = sorted(rows.values(), key=lambda r: (order(r["question_id"]), r["sample"]))
    common.write_jsonl_atomic(output, rows)  # rows first: a done record never precedes its rows
    done = sorted(done.values(), key=lambda d: order(d["question_id"]))
    common.write_jsonl_atomic(output + ".done", done)
    for path in parts:
        os.remove(path + ".done")
        os.remove(path)


# ---------------------------------------------------------------------------------------------------
# Several GPUs: data-parallel engines, each a copy of this script on its own GPUs and block of items
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Statistics (pure)
# ---------------------------------------------------------------------------------------------------
def length_summary(xs: list[int]) -> dict:
    if not xs:
        return {"count": 0}
    xs = sorted(xs)
    pick = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"count": len(xs), "mean": round(statistics.fmean(xs), 1), "min": xs[0], "p25": pick(0.25),
            "p50": pick(0.5), "p75": pick(0.75), "p90": pick(0.9), "max": xs[-1]}


def summarize(done: list[dict], counts: dict, cfg: Config) -> dict:
    """Statistics over every finished question (this run and earlier ones)."""
    scored = [d for d in done if d["status"] == "ok"]
    hist = {f"{k}/{cfg.num_samples}": 0 for k in range(cfg.num_samples + 1)}
    for d in scored:
        key = f"{d['num_correct']}/{d['num_samples']}"
        hist[key] = hist.get(key, 0) + 1
    samples = sum(d["num_samples"] for d in done)
    correct = sum(d["num_correct"] for d in scored)
    return {
        **counts,
        "questions_done": len(done),
        "questions_scored": len(scored),
        "gold_unparseable": sum(d["status"] == "gold_unparseable" for d in done),
        "samples": samples,
        "samples_correct": correct,
        "samples_truncated": sum(d["num_truncated"] for d in done),
        "samples_unformatted": sum(d["num_unformatted"] for d in done),
        "pass_rate": round(correct / max(1, sum(d["num_samples"] for d in scored)), 4),
        "pass_rate_histogram": hist,  # questions by number of verified samples
        "questions_with_rows": sum(d["kept"] > 0 for d in done),
        "rows_kept": sum(d["kept"] for d in done),
        "sample_tokens": length_summary([n for d in done for n in d["completion_tokens"] if n is not None]),
        "kept_tokens": length_summary([n for d in done for n in d["kept_tokens"] if n is not None]),
    }


def main(cfg: Config) -> dict:
    if cfg.keep < 1 or cfg.num_samples < 1:
        raise ValueError("--num_samples and --keep must be >= 1")
    if cfg.num_engines > 1 and (cfg.backend == "openai" or cfg.shard):
        raise ValueError("--num_engines > 1 starts local engines (vllm, hf), each on its own "
                         "--shard: not with --backend openai (use --concurrency) nor with --shard")
    if cfg.backend == "vllm":
        common.check_tensor_parallel(cfg.teacher, cfg.vllm_tensor_parallel_size)

    # ---- 1. Questions: load, normalize, de-duplicate, decontaminate ----------------------------------
    rows, _ = common.load_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config)
    questions = [normalize_question(r, i, cfg.dataset) for i, r in enumerate(rows)]
    if len({q["id"] for q in questions}) != len(questions):  # resume needs unique ids: use positions
        for i, q in enumerate(questions):
            q["id"] = str(i)
    counts = {"questions_in_dataset": len(questions), "duplicates_dropped": 0, "contaminated_dropped": 0}
    if cfg.dedup:
        seen, unique = set(), []
        for q in questions:
            key = question_key(q)
            if key not in seen:
                seen.add(key)
                unique.append(q)
        counts["duplicates_dropped"] = len(questions) - len(unique)
        questions = unique
    if cfg.decontaminate:
        index = set()
        for entry in cfg.decontaminate:  # a local file, or "hub_id:split" (GBaker/MedQA-USMLE-4-options:test)
            path, split = (entry, "") if os.path.exists(entry) else entry.partition(":")[::2]
            for row in common.load_rows(path, split or "test")[0]:
                for text in eval_question_texts(row):
                    index |= ngrams(text, cfg.ngram)
        clean = [q for q in questions if not (ngrams(q["question"], cfg.ngram) & index)]
        counts["contaminated_dropped"] = len(questions) - len(clean)
        questions = clean
    if cfg.limit:
        questions = questions[:cfg.limit]
    counts["questions_selected"] = len(questions)

    # ---- 2. Resume: repair the files, skip finished questions ---------------------------------------
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    if not cfg.shard:
        merge_shards(cfg.output, questions)  # engines' part files of an earlier (killed) run
    output = common.shard_path(cfg.output, cfg.shard)  # an engine appends to its own part file
    done, dropped = resume(output)
    if cfg.shard:  # the output's finished questions count too (read only: the parent owns it)
        done = {d["question_id"]: d for d in common.read_jsonl(cfg.output + ".done")[0]} | done
    lo, hi = common.shard_bounds(cfg.shard, len(questions))
    todo = [(i, q) for i, q in enumerate(questions[lo:hi], lo) if q["id"] not in done]
    print(f"distill: {len(questions)} questions ({counts['duplicates_dropped']} duplicates, "
          f"{counts['contaminated_dropped']} contaminated dropped)" + (f"; shard {cfg.shard}: "
          f"{hi - lo}" if cfg.shard else "") + f"; {len(done)} already done"
          + (f", {dropped} unfinished/torn lines dropped" if dropped else "") + f"; {len(todo)} to go")

    # ---- 3. Teacher: in this process, or --num_engines copies of this script, then merged -----------
    if cfg.num_engines > 1 and todo:
        common.run_engines(cfg, main, log_prefix=os.path.splitext(cfg.output)[0] + ".")
        merge_shards(cfg.output, questions)
        done, todo = resume(cfg.output)[0], []
    teacher = make_teacher(cfg) if todo else (lambda todo: ())  # nothing to do: load no model

    # ---- 4. Loop: sample -> normalize -> verify -> keep -> append rows, then the done record ---------
    failed, kept_rows = 0, sum(d["kept"] for d in done.values())
    bar = tqdm(total=len(todo), desc="distill", unit="q")
    with open(output, "a") as out, open(output + ".done", "a") as done_f:
        for _, q, outs in teacher(todo):
            bar.update(1)
            if any(s is None for s in outs):
                failed += 1  # not marked done: the next run retries it
                continue
            responses = [normalize_response(s["text"], q["options"])
                         if s["finish_reason"] != "length" else None for s in outs]
            scores = rewards.accuracy_reward([r or "" for r in responses], [q["gold"]] * len(outs),
                                             options=[q["options"]] * len(outs))
            status = "gold_unparseable" if any(s is None for s in scores) else "ok"
            good = [j for j, (r, s) in enumerate(zip(responses, scores)) if r is not None and s == 1.0]
            pass_rate = len(good) / len(outs)
            kept = good[:cfg.keep] if status == "ok" else []
            common.append_jsonl(out, [{
                "messages": [{"role": "user", "content": user_prompt(q, cfg.prompt_template)},
                             {"role": "assistant", "content": responses[j]}],
                "question_id": q["id"], "sample": j, "teacher": cfg.teacher, "gold": q["gold"],
                "pass_rate": pass_rate, "prompt_tokens": outs[j]["prompt_tokens"],
                "completion_tokens": outs[j]["completion_tokens"],
            } for j in kept])
            record = {"question_id": q["id"], "status": status, "num_samples": len(outs),
                      "num_correct": len(good), "kept": len(kept),
                      "num_truncated": sum(s["finish_reason"] == "length" for s in outs),
                      "num_unformatted": sum(r is None and s["finish_reason"] != "length"
                                             for r, s in zip(responses, outs)),
                      "completion_tokens": [s["completion_tokens"] for s in outs],
                      "kept_tokens": [outs[j]["completion_tokens"] for j in kept]}
            common.append_jsonl(done_f, [record])
            done[q["id"]] = record
            kept_rows += len(kept)
            bar.set_postfix(kept=kept_rows, refresh=False)
    bar.close()

    # ---- 5. Statistics -------------------------------------------------------------------------------
    if cfg.shard:  # an engine: the run that merges the parts reports
        return {"questions_failed": failed}
    selected = {q["id"] for q in questions}
    stats = summarize([d for qid, d in done.items() if qid in selected], counts, cfg)
    stats["questions_failed"] = failed
    stats["config"] = asdict(cfg)
    with open(cfg.output + ".stats.json", "w") as f:
        json.dump(stats, f, indent=2)
    print(json.dumps({k: v for k, v in stats.items() if k != "config"}, indent=2))
    if failed:
        print(f"{failed} questions had failed requests and were not finished: rerun the same command")
    return stats


if __name__ == "__main__":
    main(common.parse_config(Config, __doc__))
