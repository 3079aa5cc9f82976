"""The toy pipeline (scripts/toy.sh) end to end, shrunk to a few minutes: every stage runs with the
project's own scripts and the report is written. (Whether the full-size run learns is its report's job.)"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_toy_pipeline_end_to_end(tmp_path):
    run = tmp_path / "toy"
    env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(run), "BASE_STEPS": "40", "SFT_STEPS": "10",
           "RL_STEPS": "3", "RL_PROMPTS": "4", "N_TEST": "16", "DISTILL_N": "4", "ALIGN_STEPS": "3",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/toy.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"toy.sh failed\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert "| model | text acc %" in proc.stdout  # the table is printed

    summary = json.loads((run / "summary.json").read_text())
    for stage in ("base", "sft", "rl"):
        for bench in ("toy_text", "toy_image"):
            s = summary["stages"][stage][bench]
            assert s["items"] == 16 and 0 <= s["accuracy"] <= 1 and 0 <= s["restated"] <= 1
        assert 0 <= summary["stages"][stage]["ocr"] <= 1
        for modality in ("text", "image"):  # the mechanism probe ran on every stage
            assert set(summary["stages"][stage]["probe"][modality]) >= {"accuracy", "restated", "follows",
                                                                       "given_restated"}
    for stage in ("sft", "rl"):  # sampled at temperature 1: 4 samples of each held-out text problem
        t1 = summary["stages"][stage]["toy_text_t1"]
        assert t1["samples"] == 4 and t1["items"] == 16 and 0 <= t1["accuracy"] <= 1 and 0 <= t1["forgot_carry"] <= 1
    assert summary["rl"]["steps"] == 3
    assert summary["distill"] is not None
    assert set(summary["timings_s"]) >= {"stage 0: base VLM (sft.py, text + image rows)", "stage 1: text-only CoT SFT (sft.py)",
                                         "stage 2: text-only GRPO (rl.py --backend hf)"}
    report = (run / "report.md").read_text()
    assert "reward_curve.png" in report and (run / "reward_curve.png").stat().st_size > 1000
    # strictly text-only stages 1-2: their data has no image column, and what sft.py and rl.py loaded had no
    # image (their first log line counts the images they kept; stage 0's count shows the count is real)
    with open(run / "data/rl/orz_math.json") as f:
        assert all("image" not in json.dumps(pair) for pair in json.load(f))
    first = {stage: json.loads((run / stage / "log.jsonl").read_text().splitlines()[0]) for stage in ("base", "sft", "rl")}
    assert first["base"]["data/images"] > 0
    assert first["sft"]["data/images"] == 0 and first["sft"]["data/rows"] > 0
    assert first["rl"]["data/images"] == 0 and first["rl"]["data/prompts"] > 0

    # a second call skips every finished stage and only rewrites the report
    again = subprocess.run(["bash", "scripts/toy.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("skipped") >= 8


@pytest.mark.slow
def test_toy_ablations_end_to_end(tmp_path):
    """scripts/toy_ablations.sh shrunk: two seeds' main runs, every ablation beside them on its seed's base model,
    and one table (mean and spread over the seeds) with its plot."""
    main, out = tmp_path / "toy", tmp_path / "ablations"
    env = {**os.environ, "PYTHON": sys.executable, "MAIN_RUN": str(main), "OUT_DIR": str(out), "SEEDS": "0 1",
           "JOBS": "2", "BASE_STEPS": "20", "SFT_STEPS": "5", "RL_STEPS": "2", "RL_PROMPTS": "4", "N_TEST": "8",
           "DISTILL_N": "2", "PROBE_LIMIT": "4", "ALIGN_STEPS": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/toy_ablations.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, f"toy_ablations.sh failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from toy_ablation_report import ROWS

    table = json.loads((out / "summary.json").read_text())["table"]
    assert list(table) == [label for label, _, _ in ROWS]  # every stage and ablation, on both seeds
    for row in table.values():
        assert len(row["text acc %"]) == len(row["image acc %"]) == 2
        assert all(0 <= v <= 1 for v in row["text acc %"] + row["image acc %"])
    assert "±" in (out / "report.md").read_text() and (out / "ablations.png").stat().st_size > 1000
    for seed_run in (main, tmp_path / "toy_seed1"):  # the ablations trained from their seed's base model
        for name in ("direct", "no_misread", "rl_only"):
            assert os.path.realpath(seed_run / "ablations" / name / "base") == os.path.realpath(seed_run / "base")
        assert os.path.realpath(seed_run / "ablations/forced_exit/rl") == os.path.realpath(seed_run / "rl")
    # the direct-answer stage 1 trained on answers alone; the no-misread one on a teacher that never misreads
    timings = (main / "ablations/direct/timings.tsv").read_text()
    assert "direct-answer SFT" in timings and "CoT SFT" not in timings
    rows = [json.loads(line) for line in open(main / "ablations/no_misread/data/sft/cot_messages.jsonl")]
    assert all(re.search(r"\d\d \+ \d\d", r["messages"][0]["content"]).group(0) in r["messages"][1]["content"]
               for r in rows if re.search(r"\d\d \+ \d\d", r["messages"][0]["content"]))


def test_report_spots_a_forgotten_carry():
    """The report's slip diagnostic: a chain for a carry problem whose tens line does not add the carry."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_toy_data import chain_of_thought
    from toy_report import forgot_carry

    assert forgot_carry(chain_of_thought(23, 38, slip=True), "23 + 38")
    assert not forgot_carry(chain_of_thought(23, 38), "23 + 38")
    assert not forgot_carry(chain_of_thought(23, 31, slip=True), "23 + 31")  # no carry: nothing to forget
