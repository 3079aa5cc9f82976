"""How answers are posed, extracted and scored: shared by sft.py, rl.py, distill.py and evaluate.py.

One rule, one place: SFT teaches the format that RL rewards and evaluation parses.

    prompt = train_prompt("What is 37 + 48?")                      # the paper's training prompt
    text = format_response("37 + 48 = 85", "85")                   # <think>\n...\n</think>\n<answer>85</answer>
    extract_answer(text)                                           # "85"
    accuracy_reward([text], ["85"])                                # [1.0]
    accuracy_reward(["<answer>C: nucleus</answer>"], ["C"], [["ribosome", "wall", "nucleus"]])  # [1.0]
    extract("So x = 3, and the total is 7,425,000.", lenient=True)  # ("7425000", "last_number"): evaluation only
    extract_choice_rule("(A) or (D)", ["cat", "dog", "cow", "hen"])  # (None, None): a hedge is no answer

Extraction (`extract` / `extract_choice_rule` return the answer and the rule that found it), in this order:
 0. Cut: everything up to the last </think> (a response cut while thinking has only a complete <answer>);
    everything from a leaked chat turn on (`<|im_start|>user`, `<|eot_id|>`, ...).
 1. tag      the last <answer>...</answer> (any case; a box or an answer cue inside it is read). A nested tag
             is malformed: no answer; so is a closing tag never opened for letters (math reads past it).
 2. boxed    the last \\boxed{} / \\fbox{} (boxes that end the response one after another, joined only by
             "and", commas or \\quad, are one answer "1, 2"; a box inside a box is malformed),
    cue      or the last answer cue, whichever comes later: "Answer: X", "Final Answer\\nX", "the (final /
             correct) answer is X", Minerva's "Final Answer: The final answer is X. I hope it is correct.";
             for letters also "I choose / pick / select X", "the best option is X)", "Option X is correct",
             "X is correct", "X because ...", CJK markers (答案是 X). A cue after a box wins only if it names
             something (not "the answer is correct"). The last cue decides: an earlier one never comes back.
 3. letters  a lone letter ("b.", "(b)", "d:", "**C**", "'B'"), one option label on the last line
             ("(D) Four wheels are visible.", the same label repeated is fine), an option's text on the last
             line, not negated. Strings: a lone capital on the last line, or a one-line answer of <= 4 words.
 4. lenient only (evaluation; `lenient=True`): one marked letter on the last line ("(C)", "**C**",
    "\\textbf{C}"), a trailing ", C." / "; D"; for math the last formula ($..$, $$..$$, \\(..\\), \\[..\\]) or
    number (7,425,000 / 2,74 / 2/3) in the response, whichever is later, and inside a cue that is a sentence
    ("Final Answer: The largest $n$ is 34.") its last number or formula, as the math harnesses do.
Never a guess: a hedge between options ("(A) or (D)", "A/B", "Answer: B and C"), an echoed option list, a
negated mention ("not yellow"), a letter inside a word, acronym, identifier or URL, "A" as an article, or a
letter that is not an option is no answer. Option text equal to an option's text is that option, even when
it starts like a label ("U.S. involvement ...", "Y: $9120 yearly", "N:M"). Numbers: thousands separators and a
decimal comma (two digits after it, or a leading 0) are read as numbers.

Scoring (`accuracy_reward(completions, golds, options=None, lenient=False)`), per item:
- lenient=False (training: the paper's reward, equivalence of the extracted answer, no format reward) uses
  rules 0-3: an unformatted response's last number earns nothing. lenient=True (evaluate.py) adds rule 4.
- multiple choice (`options[i]` given, gold a letter or an option's text): the predicted letter must be
  one of the options; no answer -> 0.0 (never a random letter).
- free-form words (gold like "yes", "Evelyn"): normalised string match.
- math: Math-Verify's verdict (`verify(gold, pred)`, gold first: it is asymmetric). Easy cases are decided
  without sympy (mathcheck.py), following its rules: numbers and fractions exactly, expressions built
  from numbers, + - * / ^, \\frac, \\sqrt, \\pi and one or two variables by their values at a few points, bracketed
  tuples element by element. The rest go to worker processes with a hard per-item timeout (Math-Verify's
  own timeout uses `signal.alarm`, which cannot interrupt C code and only works on the main thread, so it
  is switched off and a stuck worker is killed instead). Results are cached: RL repeats each gold n times.
  A gold with several answers ("\\boxed{1} and \\boxed{2}", "$1$ and $2$") is read by Math-Verify as a set.
- a gold that cannot be parsed -> None (skip the item and count it), never 1.0.

Where the field's own suites disagree with each other, the choices here (tests/test_extraction_corpus.py lists
each case): the last box wins over an earlier one that prose separates from it ("\\boxed{1} ... \\boxed{2}" is 2;
Math-Verify makes a set of every box); a letter must follow its cue ("The answer is probably B" names nothing, as
lmms-eval's contract says; lighteval reads "The answer is for sure D" as D); golds are read as LaTeX only.

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
STARTUP_S = 120.0  # a new worker's own set-up (importing Math-Verify) before the per-item clock starts
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
# 2. Answer extraction (linear time: responses can be 500 KB). The order is in the module docstring.

STRICT_RULES = ("tag", "boxed", "cue", "label", "letter_line", "bare_line", "option_text")
LENIENT_RULES = ("marked_letter", "trailing_letter", "last_math", "last_number")  # only with lenient=True
_TAG_OPEN, _TAG_CLOSE = re.compile(r"<answer>", re.I), re.compile(r"</answer>", re.I)
# A chat turn the model went on to write (a leaked "<|im_start|>user"): the response ends there.
_LEAK = re.compile(r"<\|(?:im_start|im_end|endoftext|end_of_text|eot_id|start_header_id|user|assistant)\|>")
# Answer cues, last one wins. Math and letters: "Answer: X", "Final Answer\nX", "the answer is X", "answer> X".
_CUE = re.compile(r"(?i:\b(?:final\s+answer|answer)\s*(?:\*\*|__)?\s*[:：—–→⇒]|\bfinal\s+answer\s*(?:\*\*|__)?\s*\n"
                  r"|\b(?:the\s+|my\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?answer\s+(?:is|would\s+be|should\s+be)"
                  r"(?:\s*[:：])?|(?<![\w<])answer>)")
# Letters only: selection phrases ("I choose B", "The best option is B)") and CJK answer markers.
_CHOICE_CUE = re.compile(r"(?i:\bI\s+(?:choose|pick|select|(?:would|will|'d|'ll)\s+(?:choose|pick|select|go\s+with))\b"
                         r"|\bI\s+(?:think|believe)\s+(?:it'?s|it\s+is)\b"
                         r"|\bmy\s+(?:final\s+)?(?:selection|choice|pick)\s*(?:is\b|[:：])"
                         r"|\b(?:respuesta|r[ée]ponse|antwort|risposta|resposta)\s*[:：]"
                         r"|\b(?:the\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?(?:option|choice)\s+(?:is|would\s+be)"
                         r"(?:\s*[:：])?)|答案是|答案为|答案[:：]|选|옵션|정답은|답은|답\s*[:：]|答えは")
# Letter first: "Option B is correct", "b is correct", "A because ..." (a line start for the bare letter).
_LETTER_CLAIM = re.compile(r"(?i:\b(?:option|choice)\s+\(?([a-z])\)?\s+is\s+(?:the\s+)?(?:correct|right|best|answer)\b"
                           r"|(?:^|\n|\b(?:therefore|thus|hence|so)\s+)[ \t*_]*\(?([a-z])\)?[ \t*_]+"
                           r"(?:is\s+(?:the\s+)?(?:correct|right|answer)\b"
                           r"|seems\s+(?:correct|right)\b|because\b))")
_OPEN_WRAP = "*_`'\"“‘(（[ \t\n"
_CLOSE_WRAP = "*_`'\"”’)）]"
# A letter token must not be part of a word, identifier, number, URL or e-mail (ASCII or any script).
_TOKEN_AFTER = re.compile(r"[^\W_]|[_@/\-]\w|\.\w|[:.)]\w")
_CJK_SUFFIX = ("입니다", "です")
_ALTERNATIVE = re.compile(r"\s*(?:,|/|、|\bor\b|\band\b|或|和)\s*[*_`'\"(]*[A-Za-z](?![^\W_])", re.I)
_NEGATION = re.compile(r"(?i:\bnot\b|n't\b|\bnever\b|\bno\b|\bneither\b|\bnor\b|\bexcept\b|\brather\s+than\b)")
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d+/\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?|\.\d+)(?!\d|[.,/]\d)")
# A formula: \[..\], $$..$$, \(..\), $..$ (bounded: an answer is short, and the search stays linear)
_MATH_SPAN = re.compile(r"\\\[(.{1,500}?)\\\]|\$\$(.{1,500}?)\$\$|\\\((.{1,500}?)\\\)|(?<![\\$])\$((?:[^$\\]|\\.){1,500}?)\$", re.S)
_HOPE = re.compile(r"\s*I hope it is correct\.?\s*$", re.I)
# What follows "the answer is" when it judges an answer instead of giving one
_VERDICT = re.compile(r"(?i:(?:correct|right|wrong|incorrect|consistent|valid|verified|confirmed|reasonable|plausible"
                      r"|as follows|below|above|clear|indeed correct)\b|$)")


def _region(text):
    """(the part of a response that can hold its answer, cut while thinking?): everything up to the last
    </think> and from a leaked chat turn on is dropped."""
    if not isinstance(text, str) or not text.strip():
        return None, False
    cut = text.rfind(THINK_END)
    unclosed = cut < 0 and THINK_START in text
    if cut >= 0:
        text = text[cut + len(THINK_END):]
    leak = _LEAK.search(text)
    return (text[:leak.start()] if leak else text), unclosed


def _last_tag(text):
    """(content, where) of the last complete <answer>...</answer> (any case; `where` is its end), or of an
    <answer> cut by the length cap (the rest of the text; `where` is where it opens); None if no tag.
    A nested tag or a closing tag never opened is malformed: ("", where)."""
    closes = list(_TAG_CLOSE.finditer(text))
    opens = list(_TAG_OPEN.finditer(text))
    if closes:
        end = closes[-1].start()
        before = [m for m in opens if m.end() <= end]
        if not before:
            return "", closes[-1].end()  # "The answer is B.</answer>": a stray closing tag
        if len(before) > 1 and before[-2].end() > (closes[-2].end() if len(closes) > 1 else -1):
            return "", closes[-1].end()  # <answer><answer>A</answer>B</answer>: nested
        if len(closes) > 1 and closes[-2].start() > before[-1].end():
            return "", closes[-1].end()  # <answer><answer>B</answer></answer>
        return text[before[-1].end():end], closes[-1].end()
    if opens:
        tail = text[opens[-1].end():]
        return ("" if re.search(r"</\w+>", tail[:2000]) else tail), opens[-1].start()  # <answer>B</wrong>
    return None


def _box_end(text, i):
    """Index of the brace closing the one at text[i] (balanced), or -1."""
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _box_at(text, start):
    """(content, end) of the \\boxed / \\fbox starting at `start`, or (None, -1) when unbalanced."""
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    n = len(text)
    while i < n and text[i] == " " and (i + 1 < n and text[i + 1] == "{"):
        i += 1
    if i < n and text[i] == "{":
        j = _box_end(text, i)
        return (text[i + 1:j].strip(), j + 1) if j >= 0 else (None, -1)
    m = re.match(r"\s+([^\s$]+)", text[i:i + 200])  # \boxed 5
    return (m.group(1), i + m.end()) if m else (None, -1)


def _box_starts(text, before):
    return max(text.rfind("\\boxed", 0, before), text.rfind("\\fbox", 0, before))


_BOX_JOIN = re.compile(r"(?:[\s,;$&]|\\[,;:! ]|\\q?quad|\\[()\[\]]|\\text\{[^{}$]{0,40}\}|\band\b)*")


def _last_boxed(text):
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces), or `\\boxed 5`; None if none or cut.
    Boxes that end a response one after another ("\\boxed{1}, \\boxed{2} and \\boxed{3}") are one answer,
    "1, 2, 3", as Math-Verify reads them; a box inside another box is malformed (None)."""
    start = _box_starts(text, len(text))
    if start < 0:
        return None
    content, end = _box_at(text, start)
    if content is None:
        return None
    prev = _box_starts(text, start)
    if prev >= 0:
        _, pend = _box_at(text, prev)
        if pend > start:  # \boxed{B \boxed{C}}
            return None
    parts = [content]
    while prev >= 0 and len(parts) < 20:
        c, pend = _box_at(text, prev)
        gap = _BOX_JOIN.sub("", text[pend:start])
        if c is None or pend < 0 or len(gap) > 12 or "." in gap or re.search(r"[A-Za-z]{2,}", gap):
            break  # "\\boxed{1} ... \\boxed{2}": a later answer, not a list
        parts.append(c)
        start, prev = prev, _box_starts(text, prev)
    return ", ".join(reversed(parts)) if len(parts) > 1 else content


def _clean(ans: str) -> str:
    """Strip what wraps an answer but is not part of it: $..$, \\(..\\), \\[..\\], **bold**, quotes, \\text{},
    a final period."""
    s = ans.strip()
    for _ in range(6):
        old = s
        s = s.strip().strip("*_`").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$" and "$" not in s.strip("$"):
            s = s.strip("$")
        if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        m = re.fullmatch(r"\\(?:text|textbf|mathrm|mathbf|textit)\{([^{}]*)\}", s)
        if m:
            s = m.group(1)
        if len(s) >= 2 and s[0] + s[-1] in ("''", '""', "“”", "‘’"):
            s = s[1:-1]
        if s.endswith(".") and not s.endswith(".."):  # "204." -> "204" (a number never ends in ".")
            s = s[:-1]
        if s == old:
            break
    m = re.fullmatch(r"[(（]([A-Za-z])[)）]", s)  # "(C)" -> "C" (single letters only: keep "(1,2)")
    return m.group(1) if m else s


def _sentence(s: str) -> str:
    """Cut "204. So we are done" at the sentence end (not at a decimal point)."""
    m = re.search(r"\.(?:\s|$)", s)
    return s[:m.start()] if m else s


def _number_text(s: str) -> str:
    """Separators a number is written with: 7,425,000 / 1 000 / 16,\\!386 -> 7425000 / 1000 / 16386;
    2,74 / 0,111 -> 2.74 / 0.111 (a decimal comma: two digits after it, or a leading 0); \\$5 -> 5."""
    t = re.sub(r"\\[!,]", "", s.strip()).replace("\\$", "").strip("$€£ ")
    if re.fullmatch(r"-?\d+,\d\d|-?0,\d+", t):
        return t.replace(",", ".")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", t) or re.fullmatch(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?", t):
        return t.replace(",", "").replace(" ", "")
    return t if re.fullmatch(r"-?\d+(?:\.\d+)?", t) else s


def _last_cue(text, cue=_CUE):
    last = None
    for last in cue.finditer(text):
        pass
    return last


def _last_answer_cue(text):
    """The last answer cue that gives an answer: "42. Check: the answer is correct." is read at "42"."""
    m = _last_cue(text)
    if m is not None and _VERDICT.match(_cue_answer(text, m)):
        earlier = [c for c in list(_CUE.finditer(text, max(0, m.start() - 5_000), m.start()))[-5:]
                   if not _VERDICT.match(_cue_answer(text, c))]
        m = earlier[-1] if earlier else None
    return m


def _math_in(s: str, lenient: bool):
    """A sentence after an answer cue ("The largest $n$ is 34") -> its last number or formula (lenient)."""
    prose = re.findall(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+|\$[^$]*\$", "", s))
    if not lenient or len(s.split()) < 3 or len(prose) < 2:
        return s
    found = _last_math_or_number(s)
    return found[0] if found else s


def _last_math_or_number(text):
    """(answer, rule) for the last formula ($..$, $$..$$, \\(..\\), \\[..\\]) or number in prose, whichever
    comes later; None if neither."""
    tail = text[-5_000:]
    math = None
    for math in _MATH_SPAN.finditer(tail):
        pass
    num = None
    for num in _NUMBER.finditer(tail):
        pass
    if math is not None and (num is None or math.end() >= num.end()):
        body = next(g for g in math.groups() if g is not None).strip()
        if body:
            return body, "last_math"
    if num is not None:
        return num.group(0), "last_number"
    return None


def _cue_answer(text, m):
    """The answer after cue match m: the rest of its line (or the next line after "Answer:\n"), without a
    second cue ("Final Answer: The final answer is 7.78."), the Minerva sign-off or a trailing sentence."""
    rest = text[m.end():].lstrip(" \t*_:")
    if rest.startswith("\n"):  # "Final Answer\n\n7" / "Answer:\n C"
        rest = rest.lstrip()
    line = _HOPE.sub("", rest.split("\n", 1)[0].strip())
    inner = _CUE.match(line)  # "Final Answer: The final answer is 7.78": a second cue that opens the line
    if inner is not None:
        line = line[inner.end():].strip()
    return _sentence(line.strip().strip("*").strip())


def _from_region(text, lenient=False):
    """(answer, rule) inside a region (after the thinking, or inside a long <answer>), or (None, None).
    A box and an answer cue: the later one, so "\\boxed{200} ... Final Answer: 10,455" is 10,455 (a cue
    after the box must name something, not "the answer is correct")."""
    boxed = _last_boxed(text)
    m = _last_answer_cue(text)
    if m is not None:
        line = _cue_answer(text, m)
        box_at = _box_starts(text, len(text))
        named = re.search(r"[\d\\$]", line) or re.fullmatch(r"[*_(]*[A-Za-z][*_).]*", line)
        if line and (boxed is None or (m.start() > box_at and "\\boxed" not in line and named)):
            return _math_in(line, lenient), "cue"
    if boxed is not None:
        return boxed, "boxed"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        m = _LONE_LETTER.fullmatch(lines[-1])
        if m:
            return m.group(1), "letter_line"
        if len(lines) == 1 and len(lines[0]) <= 40 and len(lines[0].split()) <= 4:  # "</think>\n\n42"
            return lines[0], "bare_line"
    if lenient:
        found = _last_math_or_number(text)
        if found:
            return found
    return None, None


_LONE_LETTER = re.compile(r"[\s*_#>(\[]*([A-Z])[\s*_)\].:]*")


def extract(text, lenient: bool = False):
    """(answer, rule): the model's final answer and the rule that found it (see the order at the top), or
    (None, None). lenient=False is what training rewards (the taught format and answer cues); True adds the
    harnesses' fallbacks for unformatted responses (last formula / number)."""
    region, unclosed = _region(text)
    if region is None:
        return None, None
    tag = _last_tag(region)
    if tag is not None and not _TAG_OPEN.search(region):
        tag, region = None, _TAG_CLOSE.sub(" ", region)  # "so it is 5.</answer>": read past a lone closing tag
    if tag is not None:
        inner = tag[0]
        found, _ = _from_region(inner)  # "<answer>Answer: 5</answer>", a written solution ending in \boxed{}
        out = _clean(found if found is not None else inner)
        return (_number_text(out), "tag") if out else (None, None)
    if unclosed:
        return None, None
    found, rule = _from_region(region, lenient)
    if found is None:
        return None, None
    out = _clean(found)
    return (_number_text(out), rule) if out else (None, None)


def extract_answer(text, lenient: bool = False) -> str | None:
    """The model's final answer, or None. Everything up to the last </think> is ignored; an unclosed
    <think> (a response cut while thinking) only yields an answer from a complete <answer> tag."""
    return extract(text, lenient)[0]


# ----------------------------------------------------------------------------------------------------
# 3. Multiple choice


@functools.lru_cache(maxsize=4096)  # option texts are normalised again for every line and response
def _norm_text(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"[\s$*_`\\]+", " ", s.lower())
    return s.strip(" .,:;!?'\"()[]{}")


_LATEX_OPEN = re.compile(r"(?:\s|\\[(\[]|\$|\}|\\(?:text|textbf|mathrm|mathbf|boxed)\s*\{|[*_`'\"“‘(（\[【~])*")
_LATEX_CLOSE = re.compile(r"(?:\s|\\[)\]]|\$|\}|[*_`'\"”’)）\]】~])*")


def _letter_at(s: str, opts):
    """The option letter written at the start of s ("B", "**b**", "(C)", "c)", "`d`", "\\(E\\)", "$F$",
    "\\text{I}", "B입니다"), "" for a hedge between letters ("A or B", "C/D", "A, B") or a letter not among the
    options, None for no letter."""
    s = s[:200]
    i = _LATEX_OPEN.match(s).end()
    if i >= len(s) or not ("A" <= s[i].upper() <= "Z") or not s[i].isascii():
        return None
    rest = s[i + 1:i + 60]
    if any(rest.startswith(x) for x in _CJK_SUFFIX):
        rest = ""
    elif _TOKEN_AFTER.match(rest):
        return None  # a word: "dog", "DNA", "B2", "field_B", "b.example.org"
    letter = s[i]
    if letter.islower() and re.match(r" +(?!because\b|is\b|since\b|as\b)[a-z]{2,}", rest) and letter in "ai":
        return None  # "a dog", "i think": the article / pronoun
    j = _LATEX_CLOSE.match(rest).end()
    if _ALTERNATIVE.match(rest[j:]):
        return ""  # a hedge between options is no answer
    letter = letter.upper()
    return letter if letter in opts else ""


def _exact_option(s: str, opts):
    """The one option whose text is s (normalised); a lone letter is a letter, never an option's text."""
    key = _norm_text(s)
    if re.fullmatch(r"[a-z]", key):
        return None
    hits = [k for k, v in opts.items() if _norm_text(v) and _norm_text(v) == key] if key else []
    return hits[0] if len(hits) == 1 else None


def _choice_from_cue(text, opts):
    """(letter / "" / None, rule) from the last answer cue or letter claim in text. "" = a cue that names no
    option (no answer, no fallback to an earlier one); None = no cue at all."""
    cues = [m for m in (_last_answer_cue(text), _last_cue(text, _CHOICE_CUE)) if m is not None]
    claim = _last_cue(text, _LETTER_CLAIM)
    if claim is not None and (not cues or claim.start() > max(m.start() for m in cues)):
        letter = (claim.group(1) or claim.group(2)).upper()
        return (letter if letter in opts else ""), "cue"
    if not cues:
        return None, None
    m = max(cues, key=lambda m: m.end())
    after = text[m.end():]
    stripped = after.lstrip(" \t*_:：\u00a0\u3000")
    if stripped.startswith("\n"):
        stripped = stripped.lstrip()
    line = re.sub(r"^[-•]\s+", "", stripped.split("\n", 1)[0])  # "**Answer:**\n- C"
    line = re.sub(r"^(?i:actually|definitely|clearly|indeed|certainly|still)\s+", "", line)  # not "probably"
    if _exact_option(_sentence(line), opts):
        return _exact_option(_sentence(line), opts), "cue"
    letter = _letter_at(line, opts)
    if letter is None:
        inner = re.match(r"(?i:option|choice)\s+", line)  # "The answer is option C"
        letter = _letter_at(line[inner.end():], opts) if inner else None
    if letter is None:  # "The answer is the nucleus." / "Answer: dog" / "Final answer: I cannot tell."
        letter = _exact_option(_sentence(line), opts) or _option_in(_sentence(line), opts) or ""
        if not letter:  # a later sentence may still hold it ("the answer is not C. The diagnosis is ...")
            cut = re.search(r"[.!?](?:\s|$)|\n", stripped)
            later = stripped[cut.end():] if cut else ""
            if later.strip():
                got, rule = _implicit_choice(later, opts, lenient=False)
                if got:
                    return got, rule
    return letter, "cue"


_LABEL = re.compile(r"[ \t*_#>~`+\-]*(?:\d{1,3}\.\s+[ \t*_~`]*)?[(（\[]*([A-Za-z])"
                    r"(?:[)）\]]+[ \t*_~`]*[.:]?|[*_~`]*[.:)][ \t*_~`]*)(?:\s|$)")


def _option_in(line, opts):
    """The one option whose text the line mentions (not negated: "not yellow"), or None."""
    norm = _norm_text(line)
    found = []
    for k, v in opts.items():
        t = _norm_text(v)
        if len(t) >= 2:
            for hit in re.finditer(r"(?<!\w)" + re.escape(t) + r"(?!\w)", norm):
                before = re.split(r"[.!?;]\s", norm[max(0, hit.start() - 60):hit.start()])[-1]
                if not _NEGATION.search(before):
                    found.append(k)
                    break
    return found[0] if len(found) == 1 else None


def _implicit_choice(text, opts, lenient, texts=True):
    """(letter or None, rule) from a response without a container or cue: a lone letter, one option label
    (or the same label repeated), an option's text on the last line; lenient: one (X) or a trailing ", X."."""
    s = text.strip()
    if not s:
        return None, None
    if re.fullmatch(r"_+[A-Za-z]|[A-Za-z]_+", s):
        return None, None  # "_B": an identifier, not emphasis
    whole = _clean(s)
    if re.fullmatch(r"[A-Za-z]", whole):
        return (whole.upper() if whole.upper() in opts else None), "letter_line"
    lines = [ln.strip() for ln in s[-20_000:].splitlines() if ln.strip()]
    last = lines[-1]
    exact = _exact_option(last, opts)
    if exact:
        return exact, "option_text"
    labels = []
    for ln in lines[-200:]:  # the end of the response: where an answer, or an echoed option list, is
        m = _LABEL.match(ln) or (re.fullmatch(r"[*_`'\"(]*([A-Z])[*_`'\")]*[.:]?", ln))
        if m and _exact_option(ln, opts) is None:
            labels.append(m.group(1).upper())
    if len(set(labels)) > 1:
        return None, None  # an echoed option list, or two answers
    if labels:
        m = _LABEL.match(last) or re.fullmatch(r"[*_`'\"(]*([A-Z])[*_`'\")]*[.:]?", last)
        first = _LABEL.match(lines[0])
        if m or (len(lines) == 1 and first):
            letter = labels[0]
            if _letter_at((last if m else lines[0]).strip(" \t*_#>"), opts) == "":
                return None, None
            return (letter if letter in opts else None), "label"
    if lenient:  # one marked letter on the last line: "(C)", "**C**", "\\textbf{C}"
        marked = set(re.findall(r"(?<![\w/])(?:[(（]([A-Za-z])[)）]|\*\*([A-Z])\*\*|\\text(?:bf)?\{([A-Z])\})(?!\w)", last))
        marked = {x for m in marked for x in m if x}
        if len(marked) == 1 and not _ALTERNATIVE.search(last):
            letter = marked.pop().upper()
            return (letter if letter in opts else None), "marked_letter"
        sentence = re.split(r"(?<=[.!?])\s+", last)[-1]
        m = re.fullmatch(r"[*_(]*([A-Z])[*_)]*[.!]?", sentence)  # "A is wrong. B seems unlikely. D"
        if m and len(sentence) < len(last):
            return (m.group(1) if m.group(1) in opts else None), "trailing_letter"
        m = re.search(r"[,;]\s*([A-Z])\.?\s*$", last)
        if m and len(set(re.findall(r"(?<![^\W_])[A-Z](?![^\W_])", last))) == 1 and not _NEGATION.search(sentence):
            return (m.group(1) if m.group(1) in opts else None), "trailing_letter"
    if not texts or (len(lines) == 1 and len(last) <= 40 and len(last.split()) <= 4):
        return None, None  # a short one-line answer is read whole (above): "A ribosome ..." names no option
    found = _option_in(last, opts)
    return (found, "option_text") if found else (None, None)


def _choice_in_answer(s, opts):
    """The letter an extracted answer (a tag's or a box's content) names, or None."""
    s = str(s)[:2000]
    if "\\boxed" in s or "\\fbox" in s:
        s = _last_boxed(s) or ""
    s = _clean(s)
    if not s:
        return None
    exact = _exact_option(s, opts)  # before any label reading: "U.S. involvement ...", "N:M", "Y: $9120"
    if exact:
        return exact
    letter, _ = _choice_from_cue(s, opts)
    if letter is not None:
        return letter or None
    s2 = re.sub(r"^(?i:option|choice)\s+", "", s)
    letter = _letter_at(s2, opts)
    if letter == "":
        return None
    if letter is not None:
        lines = [ln for ln in s2.splitlines() if ln.strip()]
        if len(lines) > 1 and len({_letter_at(ln, opts) for ln in lines} - {None}) > 1:
            return None  # "<answer>B\nD</answer>"
        m = re.match(r"[*_`'\"(（\[]*[A-Za-z][*_`'\")）\]]*([.:)\]]?)\s*(.*)", s2, re.S)
        if m and s2[0] in "aA" and not m.group(1) and m.group(2) and not s2.startswith("(") \
                and re.match(r"[a-z]", m.group(2)) and not re.match(r"(?:because|is|since|as)\b", m.group(2)):
            return None  # "A ribosome synthesizes proteins.": the article
        if m and not m.group(1) and m.group(2) and re.match(r"[A-Za-z]", s2.lstrip(_OPEN_WRAP)) \
                and s2.lstrip(_OPEN_WRAP)[1:2] == " " and re.match(r"[a-z]", m.group(2)) \
                and not re.match(r"(?:because|is|since|as)\b", m.group(2)):
            return None  # "B was rejected": a letter in prose, not a label
        return letter
    got, _ = _implicit_choice(s, opts, lenient=False, texts=False)  # inside a tag: the option's text exactly
    return got


def match_choice(answer, options) -> str | None:
    """The option letter an extracted answer names, or None. Letters must exist among the options; an
    answer equal to an option's text is that option, even when the text starts like a label ("N:M")."""
    opts = normalize_options(options)
    if answer is None or not opts:
        return None
    return _choice_in_answer(answer, opts)


def extract_choice_rule(text, options, lenient: bool = False):
    """(letter, rule) a full response picks, or (None, rule or None): never a guess. See the order above."""
    opts = normalize_options(options)
    region, unclosed = _region(text)
    if region is None or not opts:
        return None, None
    tag = _last_tag(region)
    box_start = _box_starts(region, len(region))
    if tag is not None and box_start < tag[1]:  # the later container wins; a box inside the tag is the tag's
        return _choice_in_answer(tag[0], opts), "tag"
    if unclosed:
        return None, None
    if box_start >= 0:
        _, box_end = _box_at(region, box_start)
        if box_end >= 0:  # "\\boxed{75.6 kip} ... Answer: H": a later cue that names an option wins
            letter, rule = _choice_from_cue(region[box_end:], opts)
            if letter:
                return letter, rule
        boxed = _last_boxed(region)
        return (_choice_in_answer(boxed, opts) if boxed is not None else None), "boxed"
    letter, rule = _choice_from_cue(region, opts)
    if letter is not None:
        return letter or None, rule
    return _implicit_choice(region, opts, lenient)


def extract_choice(text, options, lenient: bool = False) -> str | None:
    """The option letter a full response picks, or None (never a guess)."""
    return extract_choice_rule(text, options, lenient)[0]


def _gold_letter(gold, opts) -> str | None:
    g = str(gold).strip()
    if g in opts:
        return g
    return match_choice(g, opts)


# ----------------------------------------------------------------------------------------------------
# 4. Math and free-form answers: a sympy-free fast path (mathcheck.py), Math-Verify in killable workers


def final_answer(solution) -> str:
    """A worked solution that ends "#### 72" (GSM8K's `answer` field) -> "72"; other text unchanged.
    The one place every stage reads GSM8K-style golds."""
    s = "" if solution is None else str(solution)
    return s.rsplit("####", 1)[1].strip() if "####" in s else s


def _clean_gold(gold) -> str:
    g = final_answer(gold)
    if g.count("\\boxed") > 1 or len(re.findall(r"(?<!\\)\$+", g)) > 2:
        return g.strip()  # several answers ("\\boxed{1} and \\boxed{2}", "$1$ and $2$"): Math-Verify reads them
    boxed = _last_boxed(g) if ("\\boxed" in g or "\\fbox" in g) else None
    if boxed is None and ("\\boxed" in g or "\\fbox" in g):
        return g.strip()  # an unbalanced box: Math-Verify's own reading
    return _number_text(_clean(boxed if boxed is not None else g))


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
    if pred is not None and re.search(r"\d,\s+\d", pred) and "," not in gold:
        return "slow"  # "32, 349" is a list to Math-Verify, not 32349
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


@functools.cache  # once per process (a forked worker inherits its parent's)
def _warm_up():
    """Import Math-Verify and run its lazy set-up."""
    import math_verify.grader
    import math_verify.parser
    # Its "timeout is disabled" warning: we disabled it on purpose and enforce our own (VerifyPool).
    math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    for gold, pred in (("1", "2"), ("\\frac{1}{2}", "0.5"), ("\\{1,2\\}", "\\{2,1\\}"), ("y=2x+1", "y=1+2x"),
                       ("(1,2]", "[1,2]"), ("x^2+\\sqrt{2}", "\\pi")):
        _verify_item(gold, pred)


def _worker_main(conn, inherited):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for c in inherited:  # pipe ends copied by fork: holding them would hide the parent's exit (EOF)
        c.close()
    parent = os.getppid()
    _warm_up()
    conn.send(("ready", None))  # the parent starts an item's clock from here
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
    replaced when it runs over). Forked on first use or by `start_workers()`; each worker imports
    Math-Verify itself (on another core, while the parent goes on) and says when it is ready, and an
    item's clock starts from then. Reused across calls, closed at exit. One pool per process: safe under
    torchrun (each rank its own, sized by the cores per rank)."""

    def __init__(self, workers: int | None = None, timeout: float = TIMEOUT_S):
        import multiprocessing as mp

        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            workers = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        self.ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.n, self.timeout, self.pid = workers, timeout, os.getpid()
        self.procs, self.conns, self.ready = [None] * workers, [None] * workers, [False] * workers
        self.lock = threading.Lock()

    def start(self):
        """Fork every worker now; each sets itself up in the background."""
        with self.lock:
            for i in range(self.n):
                if self.procs[i] is None:
                    self._start(i)

    def _limit(self, i) -> float:
        """Seconds worker i may take: its set-up first, then the per-item timeout."""
        return self.timeout if self.ready[i] else STARTUP_S

    def _start(self, i):
        parent, child = self.ctx.Pipe()
        inherited = [parent] + [c for c in self.conns if c is not None] if self.ctx.get_start_method() == "fork" else []
        p = self.ctx.Process(target=_worker_main, args=(child, inherited), daemon=True)
        p.start()
        child.close()
        self.procs[i], self.conns[i], self.ready[i] = p, parent, False

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
                            _warm_up()
                            results[k] = _verify_safe(*items[k])  # here, without a hard timeout
                if not busy:
                    continue
                next_deadline = min(t + self._limit(i) for i, (_, t) in busy.items())
                ready = wait([self.conns[i] for i in busy], timeout=max(0.0, next_deadline - time.monotonic()))
                for i in list(busy):
                    if self.conns[i] in ready:
                        try:
                            k, res = self.conns[i].recv()
                            if k == "ready":  # set up: the item's clock starts now
                                self.ready[i], busy[i] = True, (busy[i][0], time.monotonic())
                                continue
                            results[k] = res
                        except (EOFError, OSError):  # the worker died (e.g. out of memory): a miss
                            self._kill(i)
                        del busy[i]
                now = time.monotonic()
                for i, (k, t0) in list(busy.items()):
                    if now - t0 > self._limit(i):
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


def start_workers():
    """Fork the Math-Verify workers now, so that their set-up (about a second of imports each) runs on
    other cores while the caller loads its model. Optional: the first math item that needs a worker
    starts it otherwise."""
    get_pool().start()


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

def accuracy_reward(completions: list, golds: list, options: list | None = None, lenient: bool = False) -> list:
    """1.0 / 0.0 per completion; None where the gold cannot be parsed (skip and count it, never 1).
    options[i]: None for math / free-form items, else the options (list, dict or stringified list);
    the gold is then a letter (or an option's text, as in MathVista / OmniMedVQA).
    lenient=False (training, the paper's reward): answers come from the taught format and answer cues only;
    lenient=True (evaluation, what the harnesses do): also the last formula / number of an unformatted
    response, one "(X)" or a trailing ", X." on the last line."""
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
            out[i] = None if g is None else float(extract_choice(text, opts, lenient) == g)
        else:
            math_idx.append(i)
    if math_idx:
        preds = [extract_answer(completions[i], lenient) for i in math_idx]
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
