"""Agreement of rewards.py with other harnesses' own test suites (cases whose verdicts they decided).

    python tests/test_extraction_corpus.py      # the table: cases, agreed, % per corpus (and plain Math-Verify)

Corpora (tests/data/, one JSON object a line, each case naming its source):
- mcq_peer_cases.jsonl: lmms-eval's multiple-choice extraction contract (test/eval/mcq_extract/cases.json,
  271 cases: answer tags and boxes, answer phrases, corrections, hedges, echoed option lists, word boundaries,
  lowercase labels, markdown, CJK markers, and the benchmark attack fixtures of MMMU / MMMU-Pro / VideoMMMU /
  MMBench / SEED-Bench / AI2D parsers). "want": the letter, or null for no answer. Letters without option
  texts get "" as their text (the contract gives none).
  Also lighteval's letter-extraction cases (tests/unit/metrics/test_extractive_match.py::test_extraction_abc).
- mmmu_pro_cot_cases.jsonl: real chain-of-thought answers of GPT-4o on MMMU-Pro (standard, 10 options), as
  published with MMMU-Pro's evaluation code, with the letter its official parser read (the last 1,500
  characters of each response: the same verdict as the whole). The 8 responses of all 1,730 where this
  project reads another letter are here, each with its reason; 92 more are a random sample.
- med_mcq_cases.jsonl: a medical MCQ grader's tests (med-lm-envs tests/test_mcq_accuracy.py: the cases with
  letter options; "correct" is its verdict for the response against "gold"). Its cases with numbered options or
  with its answer-text matching switched off are left out (this project's options are letters, text always on).
- math_verify_cases.jsonl: Math-Verify's own regression tests (tests/test_*.py parametrize tables: gold,
  prediction, verdict). Evaluated as evaluate.py scores (accuracy_reward, lenient=True: the harnesses' fallbacks);
  compared with plain Math-Verify (parse + verify, default settings) on the same cases.
A case may carry "contradicts": a documented choice of this project that decides it the other way; those are
listed, and left out of the agreement (for both sides of a comparison).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too
import rewards as R  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def load(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mcq_agreement(name="mcq_peer_cases.jsonl"):
    cases = [c for c in load(name) if "contradicts" not in c]
    got = [R.extract_choice(c["text"], c["options"], lenient=True) for c in cases]
    return cases, [g == c["want"] for c, g in zip(cases, got)], got


def math_verify_agreement(plain=True):
    cases = [c for c in load("math_verify_cases.jsonl") if "contradicts" not in c]
    ours = R.accuracy_reward([c["pred"] for c in cases], [c["gold"] for c in cases], lenient=True)
    agree = [float(o or 0.0) == c["want"] for c, o in zip(cases, ours)]
    base = None
    if plain:
        from math_verify import parse, verify
        base = []
        for c in cases:
            try:
                v = int(verify(parse(c["gold"]), parse(c["pred"])))
            except Exception:
                v = 0
            base.append(v == c["want"])
    return cases, agree, base


def test_mcq_peer_agreement():
    cases, agree, got = mcq_agreement()
    misses = [(c["source"].rsplit("#", 1)[-1], c["text"], c["want"], g) for c, a, g in zip(cases, agree, got) if not a]
    assert sum(agree) >= 0.97 * len(cases), misses


def med_agreement():
    cases = [c for c in load("med_mcq_cases.jsonl") if "contradicts" not in c]
    got = R.accuracy_reward([c["text"] for c in cases], [c["gold"] for c in cases], [c["options"] for c in cases],
                            lenient=True)
    return cases, [(g == 1.0) == c["correct"] for c, g in zip(cases, got)]


def test_medical_mcq_grader_cases():
    cases, agree = med_agreement()
    assert sum(agree) >= 0.97 * len(cases), [c["source"] for c, a in zip(cases, agree) if not a]


def test_mmmu_pro_real_chain_of_thought_answers():
    cases, agree, got = mcq_agreement("mmmu_pro_cot_cases.jsonl")
    misses = [(c["source"].rsplit("#", 1)[-1], c["want"], g) for c, a, g in zip(cases, agree, got) if not a]
    assert sum(agree) >= 0.97 * len(cases), misses


def test_math_verify_regression_cases_at_least_as_many_as_math_verify():
    cases, agree, base = math_verify_agreement()
    assert sum(agree) >= 0.97 * len(cases)
    assert sum(agree) >= sum(base), [(c["gold"], c["pred"]) for c, a, b in zip(cases, agree, base) if b and not a]


def test_contradictions_are_documented():
    for name in ("mcq_peer_cases.jsonl", "mmmu_pro_cot_cases.jsonl", "med_mcq_cases.jsonl", "math_verify_cases.jsonl"):
        for c in load(name):
            assert c["source"] and (c.get("contradicts") is None or len(c["contradicts"]) > 20)


if __name__ == "__main__":
    cases, agree, _ = mcq_agreement()
    print(f"MCQ peers (lmms-eval, lighteval)   : {len(cases)} cases, {sum(agree)} agreed ({sum(agree) / len(cases):.1%})")
    cases, agree, _ = mcq_agreement("mmmu_pro_cot_cases.jsonl")
    print(f"MMMU-Pro GPT-4o CoT (official parser): {len(cases)} cases, {sum(agree)} agreed ({sum(agree) / len(cases):.1%})")
    cases, agree = med_agreement()
    print(f"medical MCQ grader (med-lm-envs)   : {len(cases)} cases, {sum(agree)} agreed ({sum(agree) / len(cases):.1%})")
    cases, agree, base = math_verify_agreement()
    print(f"Math-Verify regression tests      : {len(cases)} cases, {sum(agree)} agreed ({sum(agree) / len(cases):.1%}); "
          f"plain Math-Verify {sum(base)} ({sum(base) / len(cases):.1%})")
    R.close()
