"""rewards.py: prompts, extraction, multiple choice, math equivalence, pathological inputs, rewards."""

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mathcheck
import rewards as R

OPTS = ["ribosome", "cell wall", "nucleus", "membrane"]


def acc(pred_text, gold, options=None):
    return R.accuracy_reward([pred_text], [gold], None if options is None else [options])[0]


# ---------------------------------------------------------------------------------------------------
# prompts and format

def test_prompts_are_the_papers():
    p = R.train_prompt("What is 2+2?")
    assert p.startswith("You will solve a problem/request. You should provide your thoughts within <think> </think>")
    assert p.endswith("Here is the question: What is 2+2?")
    assert "\nWrite your final answer within <answer> </answer>" in p
    m = R.mcq_prompt("Is the earth flat?", ["Yes", "No"])
    assert "<answer>B: No</answer>" in m and m.endswith("Options: \n\nA: Yes\nB: No")
    assert "What is 1+1?" in R.math_prompt("What is 1+1?") and "<answer> answer here </answer>" in R.math_prompt("x")


def test_format_response_round_trips():
    text = R.format_response("37 + 48 = 85", "85")
    assert text == "<think>\n37 + 48 = 85\n</think>\n<answer>85</answer>"
    assert R.extract_answer(text) == "85" and R.format_reward([text]) == [1.0]


def test_options_helpers():
    assert R.normalize_options(["x", "y"]) == {"A": "x", "B": "y"}
    assert R.normalize_options({"a": "x", "B": "y"}) == {"A": "x", "B": "y"}
    assert R.normalize_options("['1', '2', 'three']") == {"A": "1", "B": "2", "C": "three"}  # MMMU
    assert R.option_letters(["p"] * 10) == list("ABCDEFGHIJ")
    assert R.format_options({"A": "Yes", "B": "No"}) == "A: Yes\nB: No"
    with pytest.raises(ValueError, match="literal"):
        R.normalize_options("__import__('os').system('echo pwned')")  # never eval
    with pytest.raises(ValueError):
        R.normalize_options({"AB": "x"})


# ---------------------------------------------------------------------------------------------------
# extraction

@pytest.mark.parametrize("text,want", [
    ("<think>the answer is 3</think>\n<answer>5</answer>", "5"),
    ("<think>\\boxed{3}</think>Answer: 7", "7"),  # ignore what is inside <think>
    ("<answer>1</answer> then <answer>2</answer>", "2"),  # last complete tag
    ("<answer>We compute... so the total is \\boxed{42}.</answer>", "42"),  # SFT: written solution
    ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
    ("so \\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("\\boxed 5", "5"), ("$\\boxed 5$", "5"), ("\\fbox{12}", "12"),
    ("\\boxed{1} ... \\boxed{2}", "2"),
    ("Final Answer: **73**", "73"), ("**Answer:** 12", "12"), ("**Answer: C**", "C"), ("Answer: (B)", "B"),
    ("so the answer is 204.", "204"), ("The answer is $3.5$.", "3.5"), ("The final answer is 1.5 m. Done", "1.5 m"),
    ("lots of reasoning\n\n**B**", "B"), ("reasoning\n(D)", "D"),
    ("...thinking forever</think>\n\n42", "42"),  # forced exit: bare answer after </think>
    ("<think>long thinking, cut by the cap, maybe 5", None),  # never finished thinking
    ("<think>unclosed <answer>6</answer>", "6"),
    ("<answer>$x=5$</answer>", "x=5"), ("<answer>  9 </answer>", "9"),
    ("<answer>7", "7"),  # cut by the length cap inside the answer
    ("<answer>Answer: 5</answer>", "5"), ("<answer>The answer is 12.</answer>", "12"), ("<answer>**B**</answer>", "B"),
    ("<answer>C: nucleus</answer>", "C: nucleus"), ("<answer>x = 5, so y = 2</answer>", "x = 5, so y = 2"),
    ("<answer>The cell wall, which protects the cell from osmotic pressure and stress</answer>",
     "The cell wall, which protects the cell from osmotic pressure and stress"),
    ("A long paragraph of text without any answer at all, which goes on for quite a while.\nAnd more.", None),
    ("", None), (None, None),
])
def test_extract_answer(text, want):
    assert R.extract_answer(text) == want


def test_extract_linear_on_huge_text():
    big = "<answer>" * 50_000 + "x" * 300_000 + "\\boxed{" * 20_000
    t = time.time()
    R.extract_answer(big), R.extract_answer(big + "</think>" + big), R.extract_choice(big, OPTS)
    assert time.time() - t < 2.0


@pytest.mark.parametrize("big", ["\\[" * 100_000, "$" * 200_000, "$1" * 100_000, "(A) " * 50_000, "A.\n" * 100_000,
                                 "\\boxed{1}" * 20_000, "the answer is " * 30_000, "Answer: A or " * 30_000, "1," * 100_000])
def test_lenient_extraction_linear_on_huge_text(big):
    t = time.time()
    R.extract(big, lenient=True), R.extract_choice_rule(big, OPTS, lenient=True), R.extract_choice_rule(big, COLORS)
    assert time.time() - t < 2.0


# ---------------------------------------------------------------------------------------------------
# math: every edge case from the benchmark notes (gold <- prediction), and more

@pytest.mark.parametrize("gold,pred,want", [
    ("\\frac12", "\\boxed{\\frac{1}{2}}", 1.0), ("5", "\\boxed 5", 1.0), ("2", "\\boxed{1} ... \\boxed{2}", 1.0),
    ("1", "\\boxed{1} ... \\boxed{2}", 0.0),
    ("28\\%", "\\boxed{0.28}", 1.0),  # documented choice: Math-Verify reads % as /100
    ("28\\%", "\\boxed{28}", 1.0),
    ("\\frac13", "\\boxed{0.3333333}", 1.0), ("\\frac13", "\\boxed{0.333}", 0.0),
    ("\\frac34", "\\boxed{3/4}", 1.0), ("7425000", "\\boxed{7,425,000}", 1.0), ("10", "\\boxed{10\\text{ cm}}", 1.0),
    ("5", "<answer>x=5</answer>", 1.0),
    ("(1,2]", "<answer>(1,2]</answer>", 1.0), ("(1,2]", "<answer>[1,2]</answer>", 0.0),
    ("\\{1,2,3\\}", "<answer>\\{3,2,1\\}</answer>", 1.0),
    ("(1,2)", "<answer>(1,2)</answer>", 1.0), ("(1,2)", "<answer>(2,1)</answer>", 0.0),  # ordered pairs
    ("4", "<answer>004</answer>", 1.0), ("2\\sqrt2", "<answer>\\sqrt8</answer>", 1.0),
    ("73", "Final Answer: **73**", 1.0), ("204", "the answer is 204.", 1.0),
    ("85", "<answer>85.0</answer>", 1.0), ("85", "<answer>86</answer>", 0.0), ("-3", "<answer>-3</answer>", 1.0),
    ("0.5", "<answer>\\frac{1}{2}</answer>", 1.0), ("\\dfrac{3}{4}", "<answer>0.75</answer>", 1.0),
    ("x^2+2x", "<answer>x(x+2)</answer>", 1.0), ("x^2+2x", "<answer>x(x+3)</answer>", 0.0),
    ("\\pi", "<answer>\\pi</answer>", 1.0), ("90^\\circ", "<answer>90</answer>", 1.0),
    ("72", "She sells 16 eggs and eats 3, keeping 72", 0.0),  # a sentence is not an answer
    ("#### 72", "<answer>72</answer>", 1.0),  # GSM8K's solution field as gold
    ("\\boxed{12}", "<answer>12</answer>", 1.0),  # a MATH solution as gold
    ("5", "<think>the answer is 5</think>", 0.0),  # thinking only: no answer
    ("5", "no answer here at all, just a long rambling paragraph that never commits to anything.", 0.0),
])
def test_math_equivalence(gold, pred, want):
    assert acc(pred, gold) == want


@pytest.mark.parametrize("gold,pred,want", [
    ("yes", "<answer>Yes.</answer>", 1.0), ("yes", "<answer>no</answer>", 0.0), ("No", "<answer>**no**</answer>", 1.0),
    ("Evelyn", "<answer>\\text{Evelyn}</answer>", 1.0), ("\\text{Evelyn}", "<answer>evelyn</answer>", 1.0),
    ("Evelyn", "<answer>Eve</answer>", 0.0), ("yes", "<think>hmm</think>", 0.0),
])
def test_free_form_words(gold, pred, want):
    assert acc(pred, gold) == want


@pytest.mark.parametrize("gold", ["", "   ", None, "\\frac{", "@@@", "}{"])
def test_unparseable_gold_is_none_never_one(gold):
    for pred in ["<answer>5</answer>", f"<answer>{gold}</answer>", "nothing", None]:
        assert acc(pred, gold) is None


# ---------------------------------------------------------------------------------------------------
# multiple choice

@pytest.mark.parametrize("text,want", [
    ("**Answer: C**", "C"), ("\\boxed{C}", "C"), ("<answer>C: nucleus</answer>", "C"), ("(C)", "C"),
    ("<answer>C</answer>", "C"), ("<answer>(C) nucleus</answer>", "C"), ("<answer>C. nucleus</answer>", "C"),
    ("<answer>nucleus</answer>", "C"), ("<answer>The nucleus.</answer>", None), ("<answer>Nucleus</answer>", "C"),
    ("<answer>Option C</answer>", "C"), ("The correct answer is (C).", "C"), ("<answer>c</answer>", "C"),
    ("<answer>A ribosome synthesizes proteins.</answer>", None),  # "A" the article is not option A
    ("A ribosome synthesizes proteins.", None),
    ("<answer>E</answer>", None), ("<answer>E: nothing</answer>", None),  # no option E
    ("<think>C is tempting</think><answer>B</answer>", "B"),
    ("<think>surely C</think>", None), ("<think>cut while thinking about C", None),
    ("</think>I pick the cell wall\nso my choice is the cell wall", "B"),  # no answer found: option text
    ("</think>Considering everything.\nThe cell wall", "B"),  # unique option text on the last line
    ("</think>Considering everything.\nribosome or nucleus", None),  # two option texts: no guess
])
def test_extract_choice(text, want):
    assert R.extract_choice(text, OPTS) == want


def test_mcq_rewards_and_golds():
    assert acc("<answer>C: nucleus</answer>", "C", OPTS) == 1.0
    assert acc("<answer>B</answer>", "C", OPTS) == 0.0
    assert acc("no answer at all, just words and more words about cells", "C", OPTS) == 0.0  # no random letter
    assert acc("<answer>C</answer>", "nucleus", OPTS) == 1.0  # gold given as option text (MathVista)
    assert acc("<answer>C</answer>", "Z", OPTS) is None  # gold not an option: unparseable
    assert acc("<answer>C</answer>", None, OPTS) is None
    assert acc("<answer>J</answer>", "J", [str(i) for i in range(10)]) == 1.0  # MMLU-Pro, A-J
    assert acc("<answer>B</answer>", "B", "['0.5', '1', '2']") == 1.0  # MMMU's stringified list
    assert acc("<answer>2</answer>", "C", ["0", "1", "2"]) == 1.0  # option text that is a number
    assert acc("<answer>B</answer>", "B", {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}) == 1.0


def test_mixed_batch_and_lengths():
    out = R.accuracy_reward(["<answer>5</answer>", "<answer>B</answer>", "<answer>yes</answer>"],
                            ["5", "B", "yes"], [None, ["p", "q"], None])
    assert out == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lengths"):
        R.accuracy_reward(["a"], ["a", "b"])


# ---------------------------------------------------------------------------------------------------
# untrusted and pathological input

def test_untrusted_answers_are_not_executed(tmp_path):
    flag = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {flag}')"
    R.accuracy_reward([f"<answer>{payload}</answer>", f"\\boxed{{{payload}}}"], ["5", "x+1"])
    R.majority_vote([payload, payload])
    assert not flag.exists()


PATHOLOGICAL = [
    "<answer>9^9^9^9^9</answer>", "<answer>9^{9^{9^{9^{9}}}}</answer>", "<answer>2^{2^{1000000}}</answer>",
    "<answer>(x+1)^{10000000}</answer>", "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    "<answer>" + "{" * 5000 + "1" + "}" * 5000 + "</answer>", "<answer>" + "1+" * 250_000 + "1</answer>",
    "x" * 500_000, "<answer>" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "</answer>", "<answer>123456!</answer>",
]


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_answers_return_fast(text):
    for gold in ["5", "\\sqrt{2}"]:
        t = time.time()
        assert acc(text, gold) == 0.0
        assert time.time() - t < R.TIMEOUT_S + 2


def test_batch_with_pathological_items_finishes_in_seconds():
    R._CACHE.clear()
    texts = PATHOLOGICAL[:6] + [f"<answer>\\frac{{{i}}}{{{i + 1}}}</answer>" for i in range(1, 60)]
    golds = ["\\sqrt{2}"] * 6 + [f"\\frac{{{i}}}{{{i + 1}}}" if i % 2 else f"\\sqrt{{{i}}}" for i in range(1, 60)]
    t = time.time()
    out = R.accuracy_reward(texts, golds)
    assert out == [0.0] * 6 + [1.0 if i % 2 else 0.0 for i in range(1, 60)]
    assert time.time() - t < 10


def test_pool_kills_a_stuck_worker_and_recovers():
    pool = R.VerifyPool(workers=1, timeout=0.5)
    try:
        # no guard in front of the pool here: sympy really computes 9^(9^9) and must be killed
        t = time.time()
        assert pool.map([("1", "9^{9^{9}}"), ("\\frac{1}{2}", "0.5")]) == [0.0, 1.0]
        assert time.time() - t < 5
        assert pool.map([("x", "x")]) == [1.0]  # a fresh worker replaced the killed one
    finally:
        pool.close()
    assert all(p is None for p in pool.procs)


def test_pool_restarts_in_a_forked_child():
    assert R.accuracy_reward(["<answer>y-1=2x</answer>"], ["y=2x+1"]) == [1.0]  # needs sympy: parent pool
    pid = os.fork()
    if pid == 0:  # child: its own pool, not the parent's workers
        ok = R.accuracy_reward(["<answer>y-3=2x</answer>"], ["y=2x+3"]) == [1.0] and R._POOL.pid == os.getpid()
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0


@settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300), st.text(max_size=30))
def test_property_random_unicode_never_raises(text, gold):
    assert R.extract_answer(text) is None or isinstance(R.extract_answer(text), str)
    R.extract_choice(text, OPTS)
    R.match_choice(text, OPTS)
    R.majority_vote([text, gold, None])
    R.format_reward([text])
    mathcheck.evaluate(text), R._fast_math(gold, text), mathcheck.tuple_parts(text)
    out = R.accuracy_reward([text, text], [gold, "C"], [None, OPTS])
    assert out[0] in (0.0, 1.0, None) and out[1] in (0.0, 1.0)
    out = R.accuracy_reward([text, text], [gold, "C"], [None, OPTS], lenient=True)
    assert out[0] in (0.0, 1.0, None) and out[1] in (0.0, 1.0)


@settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 20_000), st.sampled_from(["{", "(", "[", "\\boxed{", "\\frac{", "<answer>", "^{", "\\sqrt{"]),
       st.sampled_from(["}", ")", "]", "", "</answer>", "x"]), st.sampled_from(["1", "<answer>", "\\boxed{", "9^"]))
def test_property_nested_and_huge_never_raise_or_hang(depth, opening, closing, middle):
    text = opening * depth + middle + closing * depth
    t = time.time()
    R.extract_answer(text), R.extract_choice(text, OPTS)
    assert R.accuracy_reward([text, "</think><answer>" + text + "</answer>"], ["5", "x+1"])[0] in (0.0, 1.0)
    assert time.time() - t < R.TIMEOUT_S + 2


# ---------------------------------------------------------------------------------------------------
# other rewards and helpers

def test_format_reward():
    good = "<think>\nabc\n</think>\n<answer>5</answer>"
    assert R.format_reward([good, good + "\n"]) == [1.0, 1.0]
    bad = ["<answer>5</answer>", "<think>a</think>", "<think>a</think><answer>5</answer> extra",
           "<think>a</think><think>b</think><answer>5</answer>", "<think>a<answer>5</answer></think><answer>5</answer>",
           "", None]
    assert R.format_reward(bad) == [0.0] * len(bad)


def test_overlong_penalty():
    assert R.overlong_penalty([0, 3584, 3585, 3840, 4096, 5000], max_len=4096, cache=512) == \
        [0.0, 0.0, -1 / 512, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError):
        R.overlong_penalty([1], max_len=10, cache=0)


def test_majority_vote():
    assert R.majority_vote(["85", "85.0", "\\frac{170}{2}", "84", "84"]) == "85"
    assert R.majority_vote(["B", "C", "C", None, None, None]) == "C"
    assert R.majority_vote(["x + 1", "x+1", "y"]) == "x + 1"
    assert R.majority_vote(["1,000", "1000", "7"]) == "1,000"
    assert R.majority_vote(["3", "4"]) == "3"  # tie: first seen
    assert R.majority_vote([None, None]) is None and R.majority_vote([]) is None


# ---------------------------------------------------------------------------------------------------
# the fast path (no sympy) must agree with Math-Verify wherever it decides

ATOMS = ["0", "2", "-4", "12", "0.5", "0.333333", "0.33333", "0.6666667", "1.414214", "1.41421", "3.14159",
         "\\frac{1}{3}", "\\frac23", "\\frac{4}{6}", "\\sqrt{2}", "\\sqrt8", "2\\sqrt2", "\\pi", "\\frac{\\pi}{2}",
         "x", "2x", "x^2+2x", "x(x+2)", "(x+1)^2", "x^2+2x+1", "y", "(1,2)", "(2,1)", "[1,2]", "(1,2]", "(1, 2)",
         "(\\frac12,3)", "(0.5,3)", "(3,4,5)", "5m", "5x", "x+5", "10\\text{ cm}", "\\frac{\\sqrt2}{2}",
         "1,000,000", "x=5", "y=5", "5.0", "1\\frac12", "1.5", "(x^2)^3", "x^6", "2^{10}", "1024", "3-x",
         "\\sqrt[3]{27}", "3.0", "003", "\\dfrac{1}{2}", "1/2", "y=2x+1", "y=1+2x", "2x+1", "z=2x+1", "x=\\sqrt2",
         "x=1.414214", "\\{1,2\\}", "\\{2,1,1\\}", "\\{1,3\\}", "\\{0.5,1,2\\}", "(1,2,3)", "[1,2,3]", "(3,2,1)"]


def _fast_vs_math_verify(pairs):
    decided, disagree = 0, []
    for g, p in pairs:
        r = R._fast_math(R._clean_gold(g), p)
        if r not in ("slow", "slow0"):
            decided += 1
            if r != R._verify_item(g, p):
                disagree.append((g, p, r))
    return decided, disagree


def test_fast_path_agrees_with_math_verify_sample():
    import random
    pairs = random.Random(0).sample([(g, p) for g in ATOMS for p in ATOMS], 150)
    decided, disagree = _fast_vs_math_verify(pairs)
    assert decided > 75 and disagree == []


@pytest.mark.slow
def test_fast_path_agrees_with_math_verify_all_pairs():
    decided, disagree = _fast_vs_math_verify([(g, p) for g in ATOMS for p in ATOMS])
    assert decided > 1000 and disagree == []


@pytest.mark.parametrize("s,want", [
    ("2\\sqrt{2}", 2 * 2 ** 0.5), ("\\frac12", 0.5), ("\\frac{\\sqrt{3}}{2}", 3 ** 0.5 / 2), ("-2^{-1}", -0.5),
    ("\\sqrt[3]{27}", 3.0), ("2\\cdot3", 6.0), ("1/2/2", 0.25), ("\\pi 3", 3 * 3.141592653589793),
    ("2^10", None),  # LaTeX reads 2^1 * 0: left to Math-Verify
    ("2^{1000}", None), ("9^{9^{9}}", None), ("(-8)^{\\frac13}", None), ("\\sqrt{-1}", None), ("1/0", None),
    ("e^2", None), ("__import__('os')", None), ("x.__class__", None), ("lambda: 1", None), ("", None),
])
def test_evaluate_is_a_small_safe_reader(s, want):
    got = mathcheck.evaluate(s)
    if want is None:
        assert got is None
    else:
        assert got[0] == () and got[1][0] == pytest.approx(want)


@pytest.mark.parametrize("gold,pred,want", [
    ("5", "<answer>5 cm</answer>", 1.0), ("5", "<answer>5\\text{ apples}</answer>", 1.0),  # units dropped
    ("5", "<answer>5x</answer>", 0.0), ("x^2+6x", "<answer>7\\sqrt{3}</answer>", 0.0),
    ("(3,4)", "<answer>(4,3)</answer>", 0.0), ("(3,4)", "<answer>x^2+4</answer>", 0.0),
    ("[3,4]", "<answer>[3, 4.0]</answer>", 1.0),
    ("\\frac23", "<answer>0.666667</answer>", 1.0), ("\\frac23", "<answer>0.666666</answer>", 0.0),  # 6-decimal rule
    ("\\sqrt2", "<answer>1.414214</answer>", 1.0), ("\\sqrt2", "<answer>1.41421</answer>", 0.0),
    ("y=2x+1", "<answer>y=1+2x</answer>", 1.0), ("y=2x+1", "<answer>y=2x+2</answer>", 0.0),
    ("1.5", "<answer>1\\frac12</answer>", 1.0), ("\\frac32", "<answer>1\\frac{1}{2}</answer>", 1.0),  # mixed numbers
    ("0.5", "<answer>1\\frac12</answer>", 0.0), ("x^6", "<answer>(x^2)^3</answer>", 1.0),
    ("\\{1,2\\}", "<answer>\\{2,1,1\\}</answer>", 1.0), ("\\{1,2\\}", "<answer>\\{1,3\\}</answer>", 0.0),
    ("(1,2)", "<answer>[1,2]</answer>", 0.0), ("(1,2,3)", "<answer>[1,2,3]</answer>", 1.0),
    ("x=\\sqrt2", "<answer>\\sqrt2</answer>", 1.0), ("x=\\sqrt2", "<answer>x=1.414214</answer>", 0.0),
    ("y=2x+1", "<answer>y-1=2x</answer>", 1.0), ("p=2\\pi", "<answer>p=\\pi 2</answer>", 1.0),
    ("x=5", "<answer>5</answer>", 1.0), ("x=5", "<answer>x=5.0</answer>", 1.0), ("x=5", "<answer>y=5</answer>", 0.0),
])
def test_more_math(gold, pred, want):
    assert acc(pred, gold) == want


def test_several_processes_at_once(tmp_path):
    """Like torchrun ranks: each process its own pool, sized by LOCAL_WORLD_SIZE, none in the other's way."""
    import subprocess
    import sys
    code = ("import rewards as R\n"
            "out = R.accuracy_reward(['<answer>(1,2)</answer>', '<answer>y-1=x</answer>'],\n"
            "                        ['\\\\{1,2\\\\}', 'y=x+1'])\n"
            "assert out == [1.0, 1.0], out\nassert R._POOL.n == 1\nprint('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "LOCAL_WORLD_SIZE": "2", "PYTHONPATH": root}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "ok" in out, err[-2000:]


_LEAF = st.sampled_from(["1", "2", "3", "0.5", "x", "y", "\\pi", "\\sqrt{2}", "\\sqrt3", "\\frac12", "\\frac{3}{4}",
                         "12"])
_EXPR = st.recursive(_LEAF, lambda c: st.one_of(
    st.tuples(c, st.sampled_from(["+", "-", "*", "/", "", "\\cdot "]), c).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
    c.map(lambda a: "-" + a), st.tuples(c, st.sampled_from(["2", "3", "{-1}"])).map(lambda t: f"{t[0]}^{t[1]}"),
    st.tuples(c, c).map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"), c.map(lambda a: f"\\sqrt{{{a}}}")), max_leaves=5)


@settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(_EXPR, _EXPR, st.sampled_from(["{}", "1*{}", "{}+0", "2*{}/2", "\\left({}\\right)", "{}+0*{}"]))
def test_property_fast_path_agrees_with_math_verify(g, other, form):
    r = R._fast_math(R._clean_gold(g), other)  # a random other expression: Math-Verify's verdict
    if r not in ("slow", "slow0"):
        assert r == R._verify_item(g, other), (g, other)
    # an equal rewriting of g: right is 1.0 (Math-Verify itself misses some, e.g. x <- 1*x)
    assert R._fast_math(R._clean_gold(g), form.replace("{}", g)) in (1.0, "slow")


def _score_in_daemon(q):
    q.put(R.accuracy_reward(["<answer>y-1=2x</answer>"], ["y=2x+1"]))


def test_works_inside_a_daemonic_process():
    """A daemonic process (e.g. a data-loader worker) may not start workers: items are checked in place."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_score_in_daemon, args=(q,), daemon=True)
    p.start()
    assert q.get(timeout=60) == [1.0]
    p.join(10)


# ---------------------------------------------------------------------------------------------------
# the extraction order (issue 14): the last answer, letters in LaTeX / quotes / markdown, cues, hedges

COLORS = ["red", "blue", "green", "yellow"]


@pytest.mark.parametrize("text,want,rule", [
    ("Answer: C, because the nucleus holds DNA.", "C", "cue"), ("The answer is B. Wait, the answer is D.", "D", "cue"),
    ("\\boxed{\\text{B}}", "B", "boxed"), ("So $\\text{Answer: C}$", "C", "cue"), ("My answer: 'B'", "B", "cue"),
    ("**Answer:**\n- C", "C", "cue"), ("b.", "B", "letter_line"), ("(b)", "B", "letter_line"), ("d:", "D", "label"),
    ("<ANSWER>C</ANSWER>", "C", "tag"), ("I choose B", "B", "cue"), ("Option A is correct", "A", "cue"),
    ("The best option is B)", "B", "cue"), ("(D) Four wheels are visible.", "D", "label"),
    ("The answer is: **(C) green**", "C", "cue"), ("<think>hm</think>The answer is C<|im_start|>user\nThe answer is A", "C", "cue"),
    ("\\boxed{C}\nThe answer is correct.", "C", "boxed"),  # a cue after the box must name something
    ("(A) or (D)", None, None), ("A. red\nB. blue\nC. green\nD. yellow", None, None),  # a hedge, an echoed list
    ("the ball is not yellow", None, None), ("Answer: B and C", None, "cue"), ("The answer is A or B.", None, "cue"),
    ("I choose plan B.", None, "cue"), ("The answer is B. Checking again, the answer is correct.", "B", "cue"), ("Answer: Z. Then I pick B.", "B", "cue"), ("Answer: B\nFinal answer: E", None, "cue"),
])
def test_extract_choice_order(text, want, rule):
    assert R.extract_choice_rule(text, COLORS) == (want, rule)


@pytest.mark.parametrize("text,want,rule", [
    ("Thus \\textbf{C}", "C", "marked_letter"), ("The visible count matches (C).", "C", "marked_letter"),
    ("After checking the diagram, C.", "C", "trailing_letter"), ("Options A, B, C, D", None, None),
])
def test_extract_choice_lenient_only(text, want, rule):
    assert R.extract_choice_rule(text, COLORS, lenient=True) == (want, rule)
    assert R.extract_choice(text, COLORS) is None  # training reads the taught format and cues only


@pytest.mark.parametrize("text,strict,lenient", [
    ("Final Answer: The final answer is 7.78. I hope it is correct.", ("7.78", "cue"), ("7.78", "cue")),
    ("Final Answer: The largest $n$ is 34.", ("The largest $n$ is 34", "cue"), ("34", "cue")),
    ("so we get\n\\[ 9 \\]", (None, None), ("9", "last_math")), ("thus\n$$ 9 $$", (None, None), ("9", "last_math")),
    ("The total is 7,425,000 dollars.", (None, None), ("7425000", "last_number")),
    ("Solving it gives P(A) = 2/3. <|im_start|>user\nWhat is 1+1?", (None, None), ("2/3", "last_number")),
    ("So the answer is 42<|im_start|>user\nwhat is 3?", ("42", "cue"), ("42", "cue")),
    ("\\boxed{200} so far ... Final Answer: The final answer is $10,455$. I hope it is correct.",
     ("10455", "cue"), ("10455", "cue")),  # the later answer
    ("\\boxed{1}, \\boxed{2} and \\boxed{3}", ("1, 2, 3", "boxed"), ("1, 2, 3", "boxed")),  # one answer, as Math-Verify
    ("So the answer is 42. Let me double-check: yes, the answer is correct.", ("42", "cue"), ("42", "cue")),  # a verdict
    ("<think>t</think>The answer is 5.</answer>", ("5", "cue"), ("5", "cue")),  # a lone closing tag is read past
    ("Soucis : 2,74 $ a..", (None, None), ("2.74", "last_number")), ("\\$16,\\!386.20", ("16386.20", "bare_line"), ("16386.20", "bare_line")),
])
def test_extract_math_order(text, strict, lenient):
    assert R.extract(text) == strict and R.extract(text, lenient=True) == lenient


def test_lenient_is_evaluation_only():
    """RL keeps the paper's reward: the last number of an unformatted response earns nothing unless lenient."""
    text = "She has 16 eggs and eats 3, so she sells 13 for $26."
    assert R.accuracy_reward([text], ["26"]) == [0.0]
    assert R.accuracy_reward([text], ["26"], lenient=True) == [1.0]
    assert R.accuracy_reward(["<think>cut while thinking, maybe 26"], ["26"], lenient=True) == [0.0]


@pytest.mark.parametrize("answer,options,gold", [
    ("U.S. involvement in the war", ["U.S. involvement in the war", "Isolation"], "A"),
    ("Y: $9120 yearly", ["X: $100 monthly", "Y: $9120 yearly"], "B"), ("N:M", ["1:1", "1:N", "N:M"], "C"),
])
def test_option_text_that_looks_like_a_label_scores_one(answer, options, gold):
    for text in (f"<answer>{answer}</answer>", f"Reasoning first.\n{answer}"):
        assert R.accuracy_reward([text], [gold], [options], lenient=True) == [1.0]
    assert R.accuracy_reward([f"<answer>{answer}</answer>"], [gold], [options]) == [1.0]
