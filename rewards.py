"""How answers are posed, extracted and scored: shared by sft.py, rl.py, distill.py and evaluate.py.

One rule, one place: SFT teaches the format that RL rewards and evaluation parses.

    prompt = train_prompt("What is 37 + 48?")                      # the paper's training prompt
    text = format_response("37 + 48 = 85", "85")                   # <think>\n...\n</think>\n<answer>85</answer>
    extract_answer(text)                                           # "85"
    accuracy_reward([text], ["85"])                                # [1.0]
    accuracy_reward(["<answer>C: nucleus</answer>"], ["C"], [["ribosome", "wall", "nucleus"]])  # [1.0]

Scoring (`accuracy_reward`), per item:
- multiple choice (`options[i]` given, gold a letter or an option's text): the predicted letter must be
  one of the options; an option's text counts as its letter; "A" as an English article is not option A;
  no answer -> 0.0 (never a random letter).
- free-form words (gold like "yes", "Evelyn"): normalised string match.
- math: Math-Verify's verdict (`verify(gold, pred)`, gold first: it is asymmetric). Easy cases are decided
  without sympy (mathcheck.py), following its rules: numbers and fractions exactly, expressions built
  from numbers, + - * / ^, \\frac, \\sqrt, \\pi and one or two variables by their values at a few points, bracketed
  tuples element by element. The rest go to worker processes with a hard per-item timeout (Math-Verify's
  own timeout uses `signal.alarm`, which cannot interrupt C code and only works on the main thread, so it
  is switched off and a stuck worker is killed instead). Results are cached: RL repeats each gold n times.
- a gold that cannot be parsed -> None (skip the item and count it), never 1.0.

Model output is untrusted: nothing here evaluates it as code (no eval, no sympy.sympify/parse_expr;
Math-Verify parses LaTeX with its own grammar). Choices worth knowing: `28\\%` <- `0.28` is accepted
(Math-Verify reads `%` as /100); `\\frac13` <- `0.3333333` is accepted, `0.333` is not (Math-Verify
rounds to 6 decimals); easy cases are decided by exact value, so a few that Math-Verify misses pass
(`x` <- `1*x`); a predicted answer longer than MAX_ANSWER_CHARS, nested deeper than MAX_DEPTH, or an
explosive power (9^{9^9}, x^{10000000}) is scored 0 without calling sympy (unless it equals the gold).
"""

import ast
import atexit
import functools
import os
import re
import signal
import threading
import time
from collections import Counter, deque

from mathcheck import (MAX_DEPTH, canon, compare_numeric, evaluate, explosive, is_word, number,
                       nesting_depth, scalars_equal, simple, tuple_parts)

THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"

TIMEOUT_S = 3.0  # hard limit per math item (parse + verify) in a worker; a timed-out item scores 0
MAX_ANSWER_CHARS = 1000  # longer predicted answers are not sent to sympy (string match only)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ----------------------------------------------------------------------------------------------------
# 1. Prompts and the target format (paper, App. C)

TRAIN_PROMPT = ("You will solve a problem/request. You should provide your thoughts within <think> </think> "
                "tags before providing the answer.\nWrite your final answer within <answer> </answer> tags. "
                "Here is the question: {question}")
MCQ_PROMPT = ("You should provide your thoughts within <think> </think> tags, then answer with just one of "
              "the options below within <answer> </answer> tags (For example, if the question is 'Is the "
              "earth flat? A: Yes B: No', you should answer <think>...</think> <answer>B: No</answer>). "
              "Here is the question: {question} Options: \n\n{options}")
# The paper says "R1-Zero style" for math eval without giving the text: this is DeepSeek-R1-Zero's
# template, without its trailing "Assistant:" (the chat template opens the assistant turn).
MATH_PROMPT = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves "
               "it. The assistant first thinks about the reasoning process in the mind and then provides the "
               "user with the answer. The reasoning process and answer are enclosed within <think> </think> "
               "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
               "<answer> answer here </answer>. User: {question}")


def train_prompt(question: str) -> str:
    return TRAIN_PROMPT.format(question=question)


def math_prompt(question: str) -> str:
    return MATH_PROMPT.format(question=question)


def normalize_options(options) -> dict:
    """Options as {letter: text}, from a list (A, B, ... in order), a dict, or a stringified Python list
    (MMMU's `options` field: parsed with ast.literal_eval, never eval)."""
    if options is None:
        return {}
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as e:
            raise ValueError(f"options string is not a Python list literal: {options[:200]!r}") from e
    if isinstance(options, dict):
        out = {str(k).strip().upper(): "" if v is None else str(v) for k, v in options.items()}
        bad = [k for k in out if len(k) != 1 or k not in LETTERS]
        if bad:
            raise ValueError(f"option keys must be single letters A-Z, got {bad}")
        return out
    if isinstance(options, (list, tuple)):
        if len(options) > len(LETTERS):
            raise ValueError(f"at most {len(LETTERS)} options, got {len(options)}")
        return {LETTERS[i]: "" if t is None else str(t) for i, t in enumerate(options)}
    raise ValueError(f"options must be a list, dict or stringified list, got {type(options).__name__}")


def option_letters(options) -> list:
    return list(normalize_options(options))


def format_options(options) -> str:
    """One option per line, the paper's way: "A: Yes\\nB: No"."""
    return "\n".join(f"{k}: {v}" for k, v in normalize_options(options).items())


def mcq_prompt(question: str, options) -> str:
    return MCQ_PROMPT.format(question=question, options=format_options(options))


PROMPT_TEMPLATES = ("paper", "plain")


def pose(question: str, options=None, template: str = "paper", kind: str = "train") -> str:
    """The user turn that asks a question, identical in every stage. template "paper": the paper's MCQ
    prompt when there are options, else the training prompt (kind "train") or the math eval prompt
    (kind "math"). template "plain": the question alone, options listed below it (for tiny toy models,
    which cannot find a problem behind the paper's long instructions)."""
    if template == "plain":
        return f"{question}\n{format_options(options)}" if options else question
    if template != "paper":
        raise ValueError(f"prompt template must be one of {PROMPT_TEMPLATES}, got {template!r}")
    if options:
        return mcq_prompt(question, options)
    if kind not in ("train", "math"):
        raise ValueError(f"prompt kind must be 'train' or 'math', got {kind!r}")
    return math_prompt(question) if kind == "math" else train_prompt(question)


def format_response(thinking: str, answer: str) -> str:
    """The target format SFT teaches: <think>\\n...\\n</think>\\n<answer>...</answer>."""
    return f"{THINK_START}\n{thinking.strip()}\n{THINK_END}\n{ANSWER_START}{answer.strip()}{ANSWER_END}"


# ----------------------------------------------------------------------------------------------------
# 2. Answer extraction (linear time: responses can be 500 KB)

_ANSWER_LINE = re.compile(r"(?i:final\s+answer|answer)\s*\**\s*[:：]\s*([^\n]*)")
_ANSWER_IS = re.compile(r"(?i:the\s+(?:final\s+|correct\s+)?answer\s+is)\s*:?\s*([^\n]*)")
_LONE_LETTER = re.compile(r"[\s*_#>(\[]*([A-Z])[\s*_)\].:]*")


def _last_boxed(text: str):
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces), or `\\boxed 5`; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    n = len(text)
    while i < n and text[i] == " " and (i + 1 < n and text[i + 1] == "{"):
        i += 1
    if i < n and text[i] == "{":
        depth = 0
        for j in range(i, n):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j].strip()
        return None  # unbalanced: cut mid-answer
    m = re.match(r"\s+([^\s$]+)", text[i:i + 200])  # \boxed 5
    return m.group(1) if m else None


def _clean(ans: str) -> str:
    """Strip what wraps an answer but is not part of it: $..$, \\(..\\), **bold**, a final period."""
    s = ans.strip()
    for _ in range(4):
        old = s
        s = s.strip().strip("*_`").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
        if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        if s.endswith(".") and not s.endswith(".."):  # "204." -> "204" (a number never ends in ".")
            s = s[:-1]
        if s == old:
            break
    m = re.fullmatch(r"\(([A-Za-z])\)", s)  # "(C)" -> "C" (single letters only: keep "(1,2)")
    return m.group(1) if m else s


def _sentence(s: str) -> str:
    """Cut "204. So we are done" at the sentence end (not at a decimal point)."""
    m = re.search(r"\.(?:\s|$)", s)
    return s[:m.start()] if m else s


def _from_region(text: str):
    """Fallback order inside a region (after the thinking, or inside a long <answer>)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hits = list(_ANSWER_LINE.finditer(text))
    if hits:
        return _sentence(hits[-1].group(1).strip().strip("*").strip())
    hits = list(_ANSWER_IS.finditer(text))
    if hits:
        return _sentence(hits[-1].group(1))
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        m = _LONE_LETTER.fullmatch(lines[-1])
        if m:
            return m.group(1)
        if len(lines) == 1 and len(lines[0]) <= 40 and len(lines[0].split()) <= 4:  # "</think>\n\n42"
            return lines[0]
    return None


def extract_answer(text) -> str | None:
    """The model's final answer, or None. Everything up to the last </think> is ignored; an unclosed
    <think> (a response cut while thinking) only yields an answer from a complete <answer> tag.
    Order: last complete <answer>...</answer> (if it contains \\boxed{}, the boxed content), last
    \\boxed{}/\\fbox{}, "Answer: X", "the answer is X", a lone capital letter on the last line, a bare
    one-line answer."""
    if not isinstance(text, str) or not text:
        return None
    cut = text.rfind(THINK_END)
    if cut >= 0:
        text = text[cut + len(THINK_END):]
        unclosed = False
    else:
        unclosed = THINK_START in text
    end = text.rfind(ANSWER_END)
    start = text.rfind(ANSWER_START, 0, end) if end >= 0 else -1
    if start >= 0:
        inner = text[start + len(ANSWER_START):end]
    elif unclosed:
        return None
    else:
        tail = text.rfind(ANSWER_START)  # an <answer> cut by the length cap
        inner = text[tail + len(ANSWER_START):] if tail >= 0 else None
    if inner is not None:
        found = _from_region(inner)  # "<answer>Answer: 5</answer>", a written solution ending in \boxed{}
        if found is not None:
            inner = found
        out = _clean(inner)
        return out or None
    found = _from_region(text)
    if found is None:
        return None
    return _clean(found) or None


# ----------------------------------------------------------------------------------------------------
# 3. Multiple choice

_LETTER_PREFIX = re.compile(r"\(?([A-Z])\)?\s*[:.)\]]\s*(.*)", re.S)  # "C: nucleus", "(C) x", "C. x"
_PAREN_LETTER = re.compile(r"\(([A-Z])\)\s+(.*)", re.S)
_WORD_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*(?i:option\s*)?\(?([A-Z])\)?(?![\w])")


def _norm_text(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"[\s$*_`\\]+", " ", s.lower())
    return s.strip(" .,:;!?'\"()[]{}")


def match_choice(answer, options) -> str | None:
    """The option letter an extracted answer names, or None. Letters must exist among the options."""
    opts = normalize_options(options)
    if answer is None or not opts:
        return None
    s = _clean(str(answer))[:2000]
    s = re.sub(r"^(?i:(?:final\s+)?answer\s*[:：]?|option|choice)\s*", "", s).strip().strip("*").strip()
    s = _clean(s)
    letter = None
    if re.fullmatch(r"[A-Za-z]", s):
        letter = s.upper()
    else:
        m = _LETTER_PREFIX.fullmatch(s) or _PAREN_LETTER.fullmatch(s)
        if m:
            letter = m.group(1)
        else:
            matches = [k for k, v in opts.items() if _norm_text(v) and _norm_text(v) == _norm_text(s)]
            if len(matches) == 1:
                return matches[0]
            hits = list(_WORD_LETTER.finditer(s))
            if hits:
                letter = hits[-1].group(1)
    return letter if letter in opts else None


def extract_choice(text, options) -> str | None:
    """The option letter a full response picks, or None (never a guess). Only when no answer can be
    extracted at all: the one option whose text appears on the last line."""
    opts = normalize_options(options)
    answer = extract_answer(text)
    if answer is not None or not isinstance(text, str):
        return match_choice(answer, opts)
    tail = text[text.rfind(THINK_END) + len(THINK_END):] if THINK_END in text else text
    lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
    if not lines or (THINK_START in tail and THINK_END not in text):
        return None
    last = _norm_text(lines[-1])
    found = [k for k, v in opts.items() if len(_norm_text(v)) >= 2
             and re.search(r"(?<!\w)" + re.escape(_norm_text(v)) + r"(?!\w)", last)]
    return found[0] if len(found) == 1 else None


def _gold_letter(gold, opts) -> str | None:
    g = str(gold).strip()
    if g in opts:
        return g
    return match_choice(g, opts)


# ----------------------------------------------------------------------------------------------------
# 4. Math and free-form answers: a sympy-free fast path (mathcheck.py), Math-Verify in killable workers


def _clean_gold(gold) -> str:
    g = "" if gold is None else str(gold)
    if "####" in g:  # GSM8K's solution field
        g = g.rsplit("####", 1)[1]
    boxed = _last_boxed(g) if ("\\boxed" in g or "\\fbox" in g) else None
    return _clean(boxed if boxed is not None else g)


def _fast_math(gold: str, pred: str | None):
    """1.0 / 0.0 / None (gold unparseable) when decidable without sympy, else "slow"."""
    if not gold:
        return None
    if is_word(gold):
        if pred is not None and _norm_text(pred) == _norm_text(gold):
            return 1.0
        if len(gold) > 3 or " " in gold or gold.lower() in ("no", "yes"):
            return 0.0
        # "xy", "ab": too short to be sure it is a word and not a product of variables: ask Math-Verify
    g = number(gold)
    if pred is None:
        tp = tuple_parts(gold) if simple(gold) else None
        known = g is not None or (simple(gold) and evaluate(gold) is not None) or (
            tp is not None and all(evaluate(x) is not None for x in tp[1]))
        return 0.0 if known else "slow"  # "slow" finds out whether the gold parses
    if simple(gold) and canon(gold) == canon(pred):
        return 1.0
    p = number(pred)
    if g is not None and p is not None and g[2] and p[2] and g[2] != p[2]:
        return "slow"  # x=5 vs y=5
    if g is not None and p is not None:
        if g[0] == p[0]:
            return 1.0
        if g[1] and p[1]:
            return 0.0  # two different integers
        r = scalars_equal(float(g[0]), float(p[0]))  # Math-Verify's 6-decimal rounding
        return "slow" if r is None else r
    if len(pred) > MAX_ANSWER_CHARS or nesting_depth(pred) > MAX_DEPTH:
        return 0.0 if g is not None else "slow0"
    if explosive(pred) and not explosive(gold):  # sympy would evaluate 9^{9^{9}} digit by digit
        return 0.0 if g is not None else "slow0"
    r = compare_numeric(gold, pred) if simple(gold) else None
    return "slow" if r is None else r


@functools.lru_cache(maxsize=20_000)  # golds repeat across a prompt's rollouts
def _mv_parse(s: str):
    """Math-Verify's parse with its LaTeX extractor only: its plain-expression extractor hands text to
    sympy's parse_expr (Python eval), which model output must never reach."""
    from math_verify import parse
    wrapped = s if ("$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s) else f"${s}$"
    return parse(wrapped, extraction_config=_latex_only(), parsing_timeout=None)


@functools.cache
def _latex_only():
    """The LaTeX half of parse()'s default extraction config (its settings, not a copy of them)."""
    import inspect

    from math_verify import LatexExtractionConfig, parse
    default = inspect.signature(parse).parameters["extraction_config"].default
    return [c for c in default if isinstance(c, LatexExtractionConfig)] or [LatexExtractionConfig()]


def _verify_item(gold: str, pred: str | None):
    """Math-Verify on one item (in a worker): None if the gold does not parse, else 1.0 / 0.0."""
    from math_verify import verify
    g = _mv_parse(gold)
    if not any(not isinstance(x, str) for x in g):  # only the raw string back: not math
        return None
    if pred is None:
        return 0.0
    p = _mv_parse(pred)
    return float(bool(p) and verify(g, p, timeout_seconds=None))


def _verify_safe(gold: str, pred: str | None):
    try:
        return _verify_item(gold, pred)
    except Exception:  # a parser error on odd input is a miss, not a crash
        return 0.0


def _worker_main(conn, inherited):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for c in inherited:  # pipe ends copied by fork: holding them would hide the parent's exit (EOF)
        c.close()
    parent = os.getppid()
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent:  # the parent died without closing us: leave
                    return
            idx, gold, pred = conn.recv()
        except (EOFError, OSError):
            return
        conn.send((idx, _verify_safe(gold, pred)))


class VerifyPool:
    """Worker processes running Math-Verify, each item under a hard timeout (the worker is killed and
    replaced when it runs over). Started lazily, forked (cheap on Linux: math_verify is imported first),
    reused across calls, closed at exit. One pool per process: safe under torchrun (each rank its own,
    sized by the cores per rank)."""

    def __init__(self, workers: int | None = None, timeout: float = TIMEOUT_S):
        import multiprocessing as mp

        import math_verify.grader
        import math_verify.parser
        # Its "timeout is disabled" warning: we disabled it on purpose and enforce our own (below).
        math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        for gold, pred in (("1", "2"), ("\\frac{1}{2}", "0.5"), ("\\{1,2\\}", "\\{2,1\\}"), ("y=2x+1", "y=1+2x"),
                           ("(1,2]", "[1,2]"), ("x^2+\\sqrt{2}", "\\pi")):
            _verify_item(gold, pred)  # warm Math-Verify's lazy set-up here, once, before forking workers
        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            workers = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        self.ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.n, self.timeout, self.pid = workers, timeout, os.getpid()
        self.procs, self.conns = [None] * workers, [None] * workers
        self.lock = threading.Lock()

    def _start(self, i):
        parent, child = self.ctx.Pipe()
        inherited = [parent] + [c for c in self.conns if c is not None] if self.ctx.get_start_method() == "fork" else []
        p = self.ctx.Process(target=_worker_main, args=(child, inherited), daemon=True)
        p.start()
        child.close()
        self.procs[i], self.conns[i] = p, parent

    def _kill(self, i):
        p, c = self.procs[i], self.conns[i]
        if p is not None:
            p.kill()
            p.join()
            c.close()
        self.procs[i] = self.conns[i] = None

    def _send(self, i, msg) -> bool:
        for _ in range(2):  # a worker that died since its last item is replaced
            try:
                if self.procs[i] is None or not self.procs[i].is_alive():
                    self._kill(i)
                    self._start(i)
                self.conns[i].send(msg)
                return True
            except (BrokenPipeError, OSError):
                self._kill(i)
            except AssertionError:
                return False
        return False

    def map(self, items: list) -> list:
        """items: (gold, pred) pairs -> per item 1.0 / 0.0 / None (gold unparseable); 0.0 on timeout."""
        from multiprocessing.connection import wait
        results = [0.0] * len(items)
        with self.lock:
            todo = deque(range(len(items)))
            busy = {}  # worker -> (item index, start time)
            while todo or busy:
                for i in range(self.n):
                    if i not in busy and todo:
                        k = todo.popleft()
                        if self._send(i, (k, *items[k])):
                            busy[i] = (k, time.monotonic())
                        else:  # no worker possible (a daemonic process may not have children)
                            results[k] = _verify_safe(*items[k])  # here, without a hard timeout
                if not busy:
                    continue
                next_deadline = min(t for _, t in busy.values()) + self.timeout
                ready = wait([self.conns[i] for i in busy], timeout=max(0.0, next_deadline - time.monotonic()))
                for i in list(busy):
                    if self.conns[i] in ready:
                        try:
                            k, res = self.conns[i].recv()
                            results[k] = res
                        except (EOFError, OSError):  # the worker died (e.g. out of memory): a miss
                            self._kill(i)
                        del busy[i]
                now = time.monotonic()
                for i, (k, t0) in list(busy.items()):
                    if now - t0 > self.timeout:
                        self._kill(i)  # stuck in sympy / C code: kill it, a fresh one starts on demand
                        del busy[i]
        return results

    def close(self):
        for i in range(self.n):
            if self.procs[i] is not None and self.pid == os.getpid():
                self._kill(i)


_POOL = None


def get_pool() -> VerifyPool:
    global _POOL
    if _POOL is None or _POOL.pid != os.getpid():  # a forked child needs its own workers
        _POOL = VerifyPool()
    return _POOL


def close():
    """Stop the verification workers (also done at exit)."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


atexit.register(close)
_CACHE: dict = {}  # (gold, pred) -> score from the workers; RL repeats each gold n times


def math_equal_batch(golds: list, preds: list) -> list:
    """Equivalence of extracted answers: 1.0 / 0.0 per item, None where the gold cannot be parsed."""
    out, slow = [], []
    for k, (gold, pred) in enumerate(zip(golds, preds)):
        g = _clean_gold(gold)
        r = _fast_math(g, pred)
        if r in ("slow", "slow0"):
            key = (g, pred if r == "slow" else None)  # (gold, None): only whether the gold parses
            if key in _CACHE:
                r = _CACHE[key]
            else:
                slow.append((k, key))
        out.append(r)
    if slow:
        keys = list(dict.fromkeys(key for _, key in slow))
        res = dict(zip(keys, get_pool().map(keys)))
        if len(_CACHE) > 100_000:
            _CACHE.clear()
        _CACHE.update(res)
        for k, key in slow:
            out[k] = res[key]
    return out


# ----------------------------------------------------------------------------------------------------
# 5. Rewards

def accuracy_reward(completions: list, golds: list, options: list | None = None) -> list:
    """1.0 / 0.0 per completion; None where the gold cannot be parsed (skip and count it, never 1).
    options[i]: None for math / free-form items, else the options (list, dict or stringified list);
    the gold is then a letter (or an option's text, as in MathVista / OmniMedVQA)."""
    if len(completions) != len(golds) or (options is not None and len(options) != len(golds)):
        raise ValueError(f"accuracy_reward: {len(completions)} completions, {len(golds)} golds, "
                         f"{'no' if options is None else len(options)} options: lengths must match")
    out = [None] * len(golds)
    math_idx = []
    for i, (text, gold) in enumerate(zip(completions, golds)):
        opts = options[i] if options is not None else None
        if opts is not None:
            opts = normalize_options(opts)
            g = _gold_letter(gold, opts) if gold is not None else None
            out[i] = None if g is None else float(extract_choice(text, opts) == g)
        else:
            math_idx.append(i)
    if math_idx:
        preds = [extract_answer(completions[i]) for i in math_idx]
        for i, r in zip(math_idx, math_equal_batch([golds[i] for i in math_idx], preds)):
            out[i] = r
    return out


_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?answer>|</?think>).)*"
                     r"</answer>\s*", re.S)


def format_reward(completions: list) -> list:
    """1.0 if a completion is exactly <think>...</think> then <answer>...</answer> (one of each, nothing
    after), else 0.0. Off in the paper (reward = accuracy only); a switch in rl.py."""
    return [float(isinstance(c, str) and _FORMAT.fullmatch(c) is not None) for c in completions]


def overlong_penalty(lengths: list, max_len: int = 4096, cache: int = 512) -> list:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_len - cache tokens, then
    falling linearly to -1 at max_len (and -1 beyond). DAPO: max_len 20480, cache 4096."""
    if not 0 < cache <= max_len:
        raise ValueError(f"overlong_penalty: need 0 < cache <= max_len, got cache={cache}, max_len={max_len}")
    return [0.0 if n <= max_len - cache else max(-1.0, (max_len - cache - n) / cache) for n in lengths]


def majority_vote(answers: list) -> str | None:
    """The most common answer among extracted answers (None = no answer, ignored), grouping equivalent
    ones: equal numbers (85 = 85.0 = \\frac{170}{2}) or equal canonical strings. Ties: first seen."""
    keys, first = [], {}
    for a in answers:
        if a is None:
            continue
        num = number(str(a))
        key = ("num", num[0]) if num is not None else ("str", canon(str(a)).lower())
        keys.append(key)
        first.setdefault(key, a)
    if not keys:
        return None
    counts = Counter(keys)
    best = max(counts.values())
    return next(first[k] for k in keys if counts[k] == best)
