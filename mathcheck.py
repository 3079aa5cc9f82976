"""Deciding easy math answers without sympy, the way Math-Verify would: rewards.py's fast path.

    number("\\frac{3}{4}")                  # (Fraction(3, 4), False, ""): a plain number or fraction
    evaluate("2\\sqrt{2}+x")                # (variables, values at a few points), or None
    compare_numeric("(1,2)", "(1, 2.0)")    # 1.0 / 0.0, or None: ask Math-Verify

A small reader for + - * / ^, \\frac, \\sqrt, \\pi, tuples, sets and equations builds values directly from
tokens: nothing is evaluated as code (no eval, no sympy), so model output is safe here. Anything it is not
sure about returns None and goes to Math-Verify in a worker process (rewards.VerifyPool).
"""

import math
import re
from fractions import Fraction

MAX_DEPTH = 50  # bracket nesting beyond this is not sent to sympy

_NUM = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac(?:\{([+-]?\d+)\}\{(\d+)\}|(\d)(\d))")
_SLASH = re.compile(r"([+-]?\d+)/(\d+)")


def canon(s: str) -> str:
    """A canonical string for equality: no spaces, $, \\left/\\right, spacing commands, \\text{} wrappers."""
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\[,;:! ]|\\q?quad|[\s$]", "", s)
    s = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\{?\\circ\}?|°", "", s)
    return s.rstrip(".")


def number(s: str):
    """A plain number, fraction, or `x = number`: (Fraction, is it an integer, "x" or ""), or None."""
    s = canon(s)
    var = s[0] if re.match(r"[a-zA-Z]=", s) else ""
    s = s[2:] if var else s
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if len(s) > 60:
        return None
    if _NUM.fullmatch(s):
        return Fraction(s), "." not in s, var
    m = _FRAC.fullmatch(s)
    if m:
        num, den = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
        return (Fraction(int(num), int(den)) * (-1 if m.group(1) == "-" else 1), False, var) if int(den) else None
    m = _SLASH.fullmatch(s)
    if m and int(m.group(2)):
        return Fraction(int(m.group(1)), int(m.group(2))), False, var
    return None


_TOKEN = re.compile(r"\d+\.?\d*|\.\d+|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^(){}\[\]]")
_POINTS = (0.5377, 1.3217, 2.0719)  # where both sides' variables are evaluated


def evaluate(s: str):
    """Numeric value of a small LaTeX expression (numbers, + - * / ^, \\frac, \\sqrt, \\pi, \\cdot,
    single-letter variables) at a few points: (variables, values), or None when anything else shows up.
    A tiny recursive-descent reader: nothing is evaluated as code. Used to decide easy math without sympy."""
    s = canon(s).replace("\\cdot", "*").replace("\\times", "*").replace("\\dfrac", "\\frac")
    toks = _TOKEN.findall(s)
    if not toks or len(toks) > 200 or "".join(toks) != s or re.search(r"\d\\frac|[-+][-+]", s):
        return None  # 1\frac12 is a mixed number (1.5) to Math-Verify, and --x it reads its own way
    names = sorted({t for t in toks if len(t) == 1 and t.isalpha()})
    if len(names) > 2 or "e" in names or "i" in names:  # e and i are constants to sympy
        return None
    values = []
    for x in _POINTS:
        env = {n: x + k for k, n in enumerate(names)}
        pos = [0]

        def peek():
            return toks[pos[0]] if pos[0] < len(toks) else None

        def take(want=None):
            t = peek()
            if t is None or (want is not None and t != want):
                raise ValueError
            pos[0] += 1
            return t

        def group():  # {expr}, or one digit / letter as in \frac12
            t = peek()
            if t == "{":
                take()
                v = expr()
                take("}")
                return v
            if t is not None and t[0].isdigit():
                toks[pos[0]:pos[0] + 1] = [t[0], t[1:]] if len(t) > 1 else [t]
                return float(take())
            if t is not None and t in env:
                return env[take()]
            raise ValueError

        def atom():
            t = peek()
            if t is None:
                raise ValueError
            if t[0].isdigit() or t[0] == ".":
                return float(take())
            if t in ("(", "{", "["):
                take()
                v = expr()
                take({"(": ")", "{": "}", "[": "]"}[t])
                return v
            if t == "\\frac":
                take()
                a, b = group(), group()
                return a / b
            if t == "\\sqrt":
                take()
                n = 2.0
                if peek() == "[":
                    take()
                    n = expr()
                    take("]")
                v = group()
                if v < 0 or not 1 <= n <= 10:
                    raise ValueError
                return v ** (1 / n)
            if t == "\\pi":
                take()
                return math.pi
            if t in env:
                return env[take()]
            raise ValueError

        def power():
            v = atom()
            if peek() == "^":
                take()
                t = peek()
                if t is not None and t[0].isdigit() and len(t) > 1:
                    raise ValueError  # x^23: LaTeX reads x^2 * 3; too easy to misread, leave to sympy
                e = group() if t != "-" else -(take() and group())
                if abs(e) > 64 or abs(v) > 1e6 or (v < 0 and e != int(e)):
                    raise ValueError
                v = v ** e
            return v

        def unary():
            if peek() in ("-", "+"):
                return -unary() if take() == "-" else unary()
            return power()

        def term():
            v = unary()
            while True:
                t = peek()
                if t in ("*", "/"):
                    take()
                    w = unary()
                    v = v * w if t == "*" else v / w
                elif t is not None and t not in ("+", "-", ")", "}", "]", "^"):
                    v = v * power()  # implicit product: 2\sqrt{2}, 3x, (x+1)(x-1)
                else:
                    return v

        def expr():
            v = term()
            while peek() in ("+", "-"):
                v = v + term() if take() == "+" else v - term()
            return v

        try:
            v = expr()
            if pos[0] != len(toks) or not math.isfinite(v):
                return None
        except (ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
            return None
        values.append(v)
    return tuple(names), values


def tuple_parts(s: str):
    """"(a,b]" -> ("(]", ["a", "b"]), "\\{a,b\\}" -> ("{}", [...]) for a bracketed list of 2+ items, else None."""
    s = canon(s)
    if s.startswith("\\{") and s.endswith("\\}"):
        s = "{" + s[2:-2] + "}"
    elif len(s) < 5 or s[0] not in "([" or s[-1] not in ")]":
        return None
    parts, depth, start = [], 0, 1
    for j in range(1, len(s) - 1):
        c = s[j]
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return None  # "(1)+(2)": not one bracketed list
        if c == "," and depth == 0:
            parts.append(s[start:j])
            start = j + 1
    parts.append(s[start:-1])
    return (s[0] + s[-1], parts) if len(parts) > 1 and depth == 0 else None


def scalars_equal(g: float, p: float, strict: bool = False):
    """Math-Verify's rule for numbers (rounded to 6 decimals), where it is clear: 1.0 / 0.0 / None.
    strict: no rounding (what it does inside equations: x=\\sqrt2 is not x=1.414214)."""
    d = abs(g - p)
    if d <= 1e-12 * max(1.0, abs(g)):
        return 1.0
    if strict:
        return 0.0 if d > 1e-4 * max(1.0, abs(g)) else None
    if abs(g) > 1e6:  # floats are too coarse here to mimic the rounding
        return 0.0 if d > 1e-4 * abs(g) else None
    if d > 2e-6:
        return 0.0
    near_tie = any(abs(x * 1e6 - math.floor(x * 1e6) - 0.5) < 1e-6 for x in (g, p))
    return None if near_tie else float(round(g, 6) == round(p, 6))


_UNITLESS_VARS = set("xyznk")  # letters that are variables, never units (5m may mean 5 metres)


def equation(s: str):
    """"y = 2x+1" -> ("y", "2x+1") when the left side is one letter that the right side does not use."""
    s = canon(s)
    lhs, _, rhs = s.partition("=")
    ok = s.count("=") == 1 and re.fullmatch(r"[a-zA-Z]", lhs) and lhs not in _TOKEN.findall(rhs)
    return (lhs, rhs) if ok else None


def compare_numeric(gold: str, pred: str, strict: bool = False):
    """Decide easy math without sympy: 1.0 / 0.0, or None to ask Math-Verify."""
    if "=" in gold or "=" in pred:  # y=2x+1 <- y=1+2x or 2x+1; 5 <- x=5 (no rounding inside equations)
        ge, pe = equation(gold), equation(pred)
        if ge and pe:
            return compare_numeric(ge[1], pe[1], strict=True) if ge[0] == pe[0] else None
        if ge and "=" not in pred or pe and "=" not in gold:
            return compare_numeric(ge[1] if ge else gold, pe[1] if pe else pred, strict=True)
        return None
    gt, pt = tuple_parts(gold), tuple_parts(pred)
    if gt or pt:
        gvals = [evaluate(x) for x in gt[1]] if gt else [evaluate(gold)]
        pvals = [evaluate(x) for x in pt[1]] if pt else [evaluate(pred)]
        if any(v is None for v in gvals + pvals):
            return None
        if bool(gt) != bool(pt):
            return 0.0  # a tuple is never a single number or expression
        if any(v[0] for v in gvals + pvals) or (gt[0] == "{}") != (pt[0] == "{}"):
            return None  # variables, or a set against a tuple: Math-Verify's call
        gv, pv = [v[1][0] for v in gvals], [v[1][0] for v in pvals]
        if gt[0] == "{}":  # sets: order and repeats do not matter
            gv, pv = sorted(set(gv)), sorted(set(pv))
            if len(gv) != len(pv):  # different sizes, unless near-equal members would merge
                distinct = all(scalars_equal(a, b) == 0.0 for v in (gv, pv) for a in v for b in v if a != b)
                return 0.0 if distinct else None
        elif len(gv) != len(pv):
            return None
        same = [scalars_equal(a, b, strict) for a, b in zip(gv, pv)]
        if all(s == 1.0 for s in same):
            return 1.0 if gt[0] == pt[0] or len(gv) > 2 else 0.0  # (1,2) vs [1,2]: different intervals
        # (a,b) and [a,b] are ordered for Math-Verify (pairs, intervals); longer tuples: its call
        return 0.0 if 0.0 in same and (len(gv) == 2 or gt[0] == "{}") else None
    gv = evaluate(gold)
    pv = evaluate(pred) if gv is not None else None
    if pv is None:
        return None
    if not gv[0] and not pv[0]:
        return scalars_equal(gv[1][0], pv[1][0], strict)
    for a, b, s in ((gv, pv, pred), (pv, gv, gold)):  # an expression in x is not a number
        if not a[0] and b[0] and set(b[0]) <= _UNITLESS_VARS and "\\text" not in s and "\\mathrm" not in s:
            varies = max(b[1]) - min(b[1]) > 1e-6 * max(1.0, abs(b[1][0]))
            return 0.0 if varies else None
    if gv[0] == pv[0]:  # same variables: compare values at the same points
        err = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(gv[1], pv[1]))
        return 1.0 if err <= 1e-9 else 0.0 if err > 1e-4 else None
    return None


def is_word(gold: str) -> bool:
    """A free-form text gold (yes/no, a name), scored by normalised string match, not by sympy."""
    g = re.sub(r"\\text\{([^{}]*)\}", r"\1", gold).strip().strip(".")
    return len(g) >= 2 and re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", g) is not None


def nesting_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}":
            depth -= 1
    return best


_EXPLOSIVE = re.compile(r"\^\s*\{?\s*\(?[+-]?\d{4,}"  # a huge exponent: (x+1)^{10000000}
                        r"|\^\s*\{[^{}]*\^|\^\s*[\w.]+\s*\^"  # a tower: 2^{2^{100}}, 9^9^9
                        r"|\d{5,}\s*!")  # a huge factorial


def explosive(s: str) -> bool:
    """An expression whose value sympy would try to compute exactly and never finish."""
    return _EXPLOSIVE.search(s.replace("**", "^")) is not None


def simple(gold: str) -> bool:
    """Plain, well-formed math text: safe to call equal to an identical string without parsing it."""
    if len(gold) > 300 or not re.fullmatch(r"[\w\\{}()\[\].,;:+\-*/^=<>|!%' ]+", gold) or not re.search(r"\w", gold):
        return False
    depth = 0
    for c in gold:
        depth += (c in "{([") - (c in "})]")
        if depth < 0 or depth > MAX_DEPTH:
            return False
    return gold.count("{") == gold.count("}")
