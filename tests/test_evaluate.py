"""evaluate.py: every converter on its benchmark's real shape, scores against hand-computed values (replay
backend), the real generation path with the tiny VL model (hf backend), forced exit, and resume."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script
from fixtures_evaluate import write_fixtures

import common
import evaluate as ev


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("eval-fixtures")))


# name -> [(id, gold, options' letters (or None), kind, number of images)] after conversion
EXPECTED = {
    "gsm8k": [("0", "85", None, "math", 0), ("1", "7072", None, "math", 0), ("2", "5", None, "math", 0)],
    "mmlu_pro": [("70", "B", "ABC", "mcq", 0), ("71", "C", "ABCDE", "mcq", 0), ("72", "B", "ABCDEFGHIJ", "mcq", 0)],
    "mmlu_pro_health": [("70", "B", "ABC", "mcq", 0), ("71", "C", "ABCDE", "mcq", 0)],
    "mmmu_val": [("validation_Clinical_Medicine_1", "A", "ABC", "mcq", 2),
                 ("validation_Math_2", ["24", "24.0"], None, "free", 1),
                 ("validation_Pharmacy_3", "B", "AB", "mcq", 2)],
    "mmmu_health": [("validation_Clinical_Medicine_1", "A", "ABC", "mcq", 2),
                    ("validation_Pharmacy_3", "B", "AB", "mcq", 2)],
    "mmmu_pro_standard": [("test_Pharmacy_10", "D", "ABCDEFGHIJ", "mcq", 1),
                          ("test_History_11", "J", "ABCDEFGHIJ", "mcq", 1), ("test_Art_12", "C", "ABCDEFGHIJ", "mcq", 7)],
    "mmmu_pro_vision": [("test_Physics_5", "A", "AB", "mcq", 1)],
    "mmmu_pro_health": [("test_Pharmacy_10", "D", "ABCDEFGHIJ", "mcq", 1)],
    "mmstar": [("0", "B", "ABCD", "mcq", 1), ("1", "A", "ABC", "mcq", 1), ("2", "C", "ABCD", "mcq", 1)],
    "mathvista_testmini": [("1", "B", "ABC", "mcq", 1), ("2", "12", None, "math", 1), ("3", "1.25", None, "math", 1)],
    "mathvision": [("1", "C", "ABCDE", "mcq", 1), ("2", "12", None, "math", 1)],
    "medqa": [("0", "E", "ABCDE", "mcq", 0)],
    "medqa_4opt": [("0", "B", "ABCD", "mcq", 0)],
    "medxpertqa_mm": [("MM-7", "C", "ABCDE", "mcq", 1)],
    "medxpertqa_text": [("Text-3", "H", "ABCDEFGHIJ", "mcq", 0)],
    "omnimedvqa": [("ACRIMA_0001", "B", "AB", "mcq", 1)],
    "nejm": [("20230105", "D", "ABCDE", "mcq", 1)],  # the two date-only items: no image, skipped
    "math500": [("test/prealgebra/1.json", "\\frac{1}{2}", None, "math", 0)],
    "gpqa_diamond": [("rec06pnAkLOr2t2mp", None, "ABCD", "mcq", 0)],  # gold: wherever the shuffle put it
    "toy_text": [("0", "42", None, "math", 0)],
    "toy_image": [("toy-0", "42", None, "math", 1)],
}


def test_every_registered_benchmark_converts_its_real_shape(fixtures):
    assert set(EXPECTED) == set(ev.REGISTRY)
    for name, want in EXPECTED.items():
        items = ev.load_items(name, ev.Config(data_dir=fixtures))
        got = [(it["id"], it["gold"], "".join(it["options"]) if it["options"] else None, it["kind"],
                len(it["images"])) for it in items]
        if name == "gpqa_diamond":
            got = [g[:1] + (None,) + g[2:] for g in got]
        assert got == want, name
        for it in items:
            assert all(im.mode == "RGB" for im in it["images"])


def test_converter_details(fixtures):
    cfg = ev.Config(data_dir=fixtures)
    load = lambda name: ev.load_items(name, cfg)
    assert "N/A" not in load("mmlu_pro")[0]["options"].values()
    assert load("mmstar")[0]["options"] == {"A": "circle", "B": "square", "C": "a triangle", "D": "star"}
    assert "Options:" not in load("mmstar")[0]["question"]
    star = load("mmstar")  # the "(A) 40.7" rows keep their real options, count and order
    assert star[1]["options"] == {"A": "40.7", "B": "41.2", "C": "43.5"} and star[1]["question"].endswith("smallest bar?")
    assert star[2]["options"] == {"A": "the tree", "B": "the house", "C": "the tower", "D": "the man"}
    assert "Answer Choices" not in load("medxpertqa_mm")[0]["question"]
    assert load("mathvista_testmini")[0]["options"]["B"] == "green"  # gold text "green" -> its letter
    assert load("mathvision")[0]["question"].startswith("<image 1>")
    gpqa = load("gpqa_diamond")[0]
    assert gpqa["options"][gpqa["gold"]] == "Electron" and sorted(gpqa["options"].values()) == \
        ["Electron", "Neutron", "Pion", "Proton"]
    assert load("gpqa_diamond")[0]["options"] == gpqa["options"]  # the shuffle is the same every run
    assert [it["id"] for it in ev.load_items("mmlu_pro", ev.Config(data_dir=fixtures, limit=2))] == ["70", "71"]


def test_mmmu_images_sit_at_their_placeholders(fixtures):
    item = ev.load_items("mmmu_val", ev.Config(data_dir=fixtures))[0]  # <image 1> in the question, <image 2> option C
    content = json.loads(ev.build_prompt(item, None)["prompt"])
    kinds = [c["type"] for c in content]
    assert kinds == ["text", "image", "text", "image"]
    assert content[2]["text"].startswith(" Which finding is shown?") and content[2]["text"].endswith("C: ")
    p = ev.build_prompt(item, None)
    assert p["images"][0] is not p["images"][1] and p["images"][0].size == item["images"][0].size
    blind = ev.build_prompt(item, None, with_images=False)  # text-solvable analysis / text-only model
    assert blind["images"] == [] and "<image" not in blind["prompt"] and "Which finding" in blind["prompt"]
    mathvista = ev.load_items("mathvista_testmini", ev.Config(data_dir=fixtures))[0]
    content = json.loads(ev.build_prompt(mathvista, None)["prompt"])  # no placeholder: the image goes first
    assert [c["type"] for c in content] == ["image", "text"]


@pytest.mark.parametrize("question,stem,options", [
    ("Which?\nOptions: A: circle, B: square, C: a triangle", "Which?", {"A": "circle", "B": "square", "C": "a triangle"}),
    ("Q?\nChoices:\n(A) 40.7\n(B) 41.2", "Q?", {"A": "40.7", "B": "41.2"}),
    ("Q?\nAnswer Choices: (A) Pneumonia (B) Effusion (C) Mass", "Q?", {"A": "Pneumonia", "B": "Effusion", "C": "Mass"}),
    ("Q?\nA. U.S. involvement\nB. Y: $9120 yearly\nC. N:M", "Q?", {"A": "U.S. involvement", "B": "Y: $9120 yearly", "C": "N:M"}),
    ("Options: A. x, B. y, C. z, D. w", "", {"A": "x", "B": "y", "C": "z", "D": "w"}),
    ("Which vitamin? Vitamin A or vitamin C?", None, None),  # letters in prose are not an option list
])
def test_inline_options_in_every_common_shape(question, stem, options):
    got = ev.inline_options(question)
    assert got == (None if options is None else (stem, options))


def test_nejm_images_by_date_or_an_explicit_counted_skip(fixtures, tmp_path):
    items = ev.load_items("nejm", ev.Config(data_dir=fixtures))
    assert [it["id"] for it in items] == ["20230105"] and len(items.skipped) == 2
    assert "'20230112'" in items.skipped[0] and "'20230119'" in items.skipped[1]
    found = ev.load_items("nejm", ev.Config(data_dir=fixtures, nejm_image_dir=os.path.join(fixtures, "nejm_images")))
    assert [it["id"] for it in found] == ["20230105", "20230112"] and len(found[1]["images"]) == 1
    (tmp_path / "nejm.json").write_text(json.dumps([{"date": "20240101", "question": "q", "option_A": "x",
                                                     "option_B": "y", "correct_answer": "A"}]))
    with pytest.raises(ValueError, match="every item lacks its image.*nejm_image_dir"):
        ev.load_items("nejm", ev.Config(data_dir=str(tmp_path)))
    rows = [{**{f"image_{k}": None for k in range(1, 8)}, "id": "validation_Art_1", "question": "<image 2> style?",
             "options": "['a', 'b']", "image_1": None, "answer": "A", "question_type": "multiple-choice"}]
    (tmp_path / "mmmu_val.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(dict(rows[0], id="validation_Art_2",
                                                                                            question="No image here?")) + "\n")
    mmmu = ev.load_items("mmmu_val", ev.Config(data_dir=str(tmp_path)))  # <image 2> but no image_2: skipped
    assert [it["id"] for it in mmmu] == ["validation_Art_2"] and "image 2" in mmmu.skipped[0]


def test_each_image_once_and_the_engine_limit_fits_the_largest_item(fixtures):
    items = ev.load_items("mmmu_pro_standard", ev.Config(data_dir=fixtures))
    art = items[2]  # 7 images, 35 mentions
    text = art["question"] + " ".join(art["options"].values())
    assert len(art["images"]) == 7 and text.count("<image ") == 35
    p = ev.build_prompt(art, None)
    content = json.loads(p["prompt"])
    assert len(p["images"]) == 7 and sum(c["type"] == "image" for c in content) == 7
    assert p["images"] == [im for im in art["images"]]  # in the order of their first mention
    assert sum(c.get("text", "").count("[image ") for c in content) == 28  # later mentions as text
    assert ev.max_images(items) == 7 and ev.max_images([]) == 0
    assert max(ev.max_images(ev.load_items(b, ev.Config(data_dir=fixtures))) for b in ev.REGISTRY) == 7


def test_option_text_equal_to_the_gold_text_scores_one():
    opts = {"A": "U.S. involvement in the war", "B": "Y: $9120 yearly", "C": "N:M"}
    for letter, text in opts.items():
        assert ev.score([f"<think>t</think><answer>{text}</answer>", f"<think>t</think>\n{text}"], [letter] * 2,
                        [opts] * 2) == [1.0, 1.0]


def test_bad_rows_name_the_file_row_and_field(tmp_path):
    (tmp_path / "gsm8k.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    with pytest.raises(ValueError, match=r"gsm8k\.jsonl row 1.*'answer'"):
        ev.load_items("gsm8k", ev.Config(data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="mmstar"):
        ev.load_items("mmstar", ev.Config(data_dir=str(tmp_path)))


def test_summarize_by_hand():
    rec = lambda correct, extracted, **kw: {"correct": correct, "extracted": extracted, "responses": ["r"] * len(correct),
                                            "tokens": [10] * len(correct), "truncated": [False] * len(correct),
                                            "forced_exit": [False] * len(correct), **kw}
    records = [rec([1.0, 0.0, 0.0], ["5", "6", "6"]),           # maj votes 6: wrong
               rec([0.0, 1.0, 1.0], ["7", "8.0", "8"]),         # 8.0 and 8 are one vote: right
               rec([None, None, None], ["1", None, None])]     # gold unparseable: skipped, counted
    s = ev.summarize(records, 3)
    assert s["items"] == 3 and s["scored"] == 2 and s["gold_unparseable"] == 1
    assert s["accuracy"] == 0.5 and s["avg@3"] == pytest.approx(0.5) and s["maj@3"] == 0.5 and s["pass@3"] == 1.0
    assert s["parse_failure_rate"] == pytest.approx(2 / 9)
    assert ev.majority_correct([None, None], [0.0, 0.0]) == 0.0


def test_summary_tallies_how_each_answer_was_read():
    texts = ["<think>t</think><answer>5</answer>", "<think>t</think>so it is \\boxed{5}", "After all that, we get 5 apples.",
             "<think>never finished"]
    correct = ev.score(texts, ["5"] * 4, [None] * 4)
    assert correct == [1.0, 1.0, 1.0, 0.0]  # evaluation reads the harnesses' fallbacks (the last number)
    rec = {"correct": correct, "responses": texts, "extracted": [None] * 4, "tokens": [1] * 4, "truncated": [False] * 4,
           "forced_exit": [False] * 4, "extraction_rule": [ev.extraction_rule(t, None) for t in texts]}
    assert rec["extraction_rule"] == ["tag", "boxed", "last_number", "none"]
    s = ev.summarize([rec], 4)
    assert s["extraction_rules"] == {"tag": 1, "boxed": 1, "last_number": 1, "none": 1}
    assert s["parse_failure_rate"] == 0.25 and s["lenient_rate"] == 0.25 and s["accuracy_lenient_share"] == 0.0
    assert ev.extraction_rule("Thus (C).", {"A": "x", "B": "y", "C": "z"}) == "marked_letter"


# ---- end to end with scripted responses: scores checked against hand-computed values --------------------
R = lambda *xs: [x if isinstance(x, dict) else f"<think>t</think><answer>{x}</answer>" for x in xs]
REPLAY = [
    # gsm8k: golds 85, 7072, 5
    {"benchmark": "gsm8k", "id": "0", "responses": R("85", "85", {"text": "<think>c</think><answer>84</answer>",
                                                                  "forced_exit": True})},
    {"benchmark": "gsm8k", "id": "1", "responses": R("7000", "7072", {"text": "<think>thinking forever",
                                                                      "finish_reason": "length", "tokens": 100})},
    {"benchmark": "gsm8k", "id": "2", "responses": R("5", "6", "6")},
    # mmlu_pro_health: golds B (Heart), C
    {"benchmark": "mmlu_pro_health", "id": "70", "responses": R("B: Heart", "Heart", "A")},
    {"benchmark": "mmlu_pro_health", "id": "71",  # U+2028 must not split a JSONL line on resume
     "responses": R("D", "C") + ["<think>a\u2028b</think><answer>C</answer>"]},
    # mmmu_val: golds A, ['24', '24.0'], B; the noimage responses decide what is text-solvable
    {"benchmark": "mmmu_val", "id": "validation_Clinical_Medicine_1", "responses": R("A", "A", "A"),
     "noimage_responses": R("A", "A", "A")},
    {"benchmark": "mmmu_val", "id": "validation_Math_2", "responses": R("24.0", "25", "24"),
     "noimage_responses": R("3", "3", "3")},
    {"benchmark": "mmmu_val", "id": "validation_Pharmacy_3", "responses": R("A", "B", "B"),
     "noimage_responses": R("B", "B", "B")},
    # mathvista_testmini: golds B (green), 12, 1.25
    {"benchmark": "mathvista_testmini", "id": "1", "responses": R("green", "B", "C"),
     "noimage_responses": R("green", "A", "A")},
    {"benchmark": "mathvista_testmini", "id": "2", "responses": R("12", "12", "12"),
     "noimage_responses": R("11", "11", "11")},
    {"benchmark": "mathvista_testmini", "id": "3", "responses": R("1.3", "1.25", "1.25"),
     "noimage_responses": R("2", "2", "2")},
]
HAND = {  # accuracy is the first sample's; maj@3 groups 24.0 with 24; text-solvable: right without the image
    "gsm8k": {"accuracy": 2 / 3, "avg@3": 4 / 9, "maj@3": 1 / 3, "pass@3": 1.0, "parse_failure_rate": 1 / 9,
              "truncation_rate": 1 / 9, "forced_exit_rate": 1 / 9, "mean_tokens": 12.0},
    "mmlu_pro_health": {"accuracy": 0.5, "avg@3": 2 / 3, "maj@3": 1.0, "pass@3": 1.0, "parse_failure_rate": 0.0},
    "mmmu_val": {"accuracy": 2 / 3, "avg@3": 7 / 9, "maj@3": 1.0, "pass@3": 1.0, "text_solvable": 2,
                 "text_solvable_removed_items": 1, "text_solvable_removed_accuracy": 1.0},
    "mathvista_testmini": {"accuracy": 2 / 3, "avg@3": 7 / 9, "maj@3": 1.0, "pass@3": 1.0, "text_solvable": 1,
                           "text_solvable_removed_items": 2, "text_solvable_removed_accuracy": 0.5},
}


def replay_run(fixtures, tmp_path, out, replay=REPLAY, cli=False, **extra):
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in replay))
    args = dict(backend="replay", replay_file=str(path), data_dir=fixtures, output_dir=str(out),
                benchmarks=["gsm8k,mmlu_pro_health", "mmmu_val", "mathvista_testmini"], num_samples=3,
                temperature=0.3, text_solvable_removed=True, items_per_call=2, **extra)
    if cli:  # through the command line once: every flag parses
        flags = []
        for k, v in args.items():
            flags += [f"--{k}"] + ([] if v is True else v if isinstance(v, list) else [str(v)])
        run_script("evaluate.py", *flags)
    else:
        ev.main(ev.Config(**args))
    with open(out / "summary.json") as f:
        return json.load(f)


def test_replay_end_to_end_scores_resume_and_compare(fixtures, tmp_path):
    out = tmp_path / "run"
    summary = replay_run(fixtures, tmp_path, out, cli=True)
    for bench, want in HAND.items():
        got = summary["benchmarks"][bench]
        for key, value in want.items():
            assert got[key] == pytest.approx(value), (bench, key)
    # per-item JSONL: everything a researcher needs to see where a model fails
    rows = [json.loads(line) for line in open(out / "mmmu_val.jsonl")]
    assert [r["id"] for r in rows] == ["validation_Clinical_Medicine_1", "validation_Math_2", "validation_Pharmacy_3"]
    for key in ("prompt", "responses", "extracted", "correct", "tokens", "truncated", "forced_exit", "noimage_correct"):
        assert len(rows[0][key]) if key != "prompt" else rows[0][key]
    assert rows[0]["n_images"] == 2 and rows[2]["choice"] == ["A", "B", "B"]
    table = (out / "results.md").read_text()
    assert "| mmmu_val | 3 | 66.7 | 77.8 | 100.0 | 100.0 |" in table

    # Resume: a torn last line and a missing benchmark file; finished items must not be asked again
    lines = (out / "gsm8k.jsonl").read_text().splitlines(keepends=True)
    (out / "gsm8k.jsonl").write_text(lines[0] + lines[1][:40])
    os.remove(out / "mmmu_val.jsonl")
    os.remove(out / "summary.json")
    again = replay_run(fixtures, tmp_path, out, replay=[r for r in REPLAY if (r["benchmark"], r["id"]) != ("gsm8k", "0")])
    assert again["benchmarks"] == summary["benchmarks"]
    assert [json.loads(line)["id"] for line in open(out / "gsm8k.jsonl")] == ["0", "1", "2"]

    # Compare two runs side by side
    other = tmp_path / "other"
    replay_run(fixtures, tmp_path, other, replay=[dict(r, responses=R("A", "A", "A")) for r in REPLAY])
    run_script("evaluate.py", "--compare", str(out), str(other), "--output_dir", str(tmp_path / "cmp"))
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| benchmark | run | other |" in md and "| mmlu_pro_health | 50.0 | 0.0 |" in md
    if importlib.util.find_spec("matplotlib"):  # the vLLM venv has none
        assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


# ---- the real generation path: tiny Qwen2.5-VL through generation.py's hf backend ----------------------
def test_hf_tiny_vl_with_images_and_forced_exit(fixtures, tiny_vl_dir, tmp_path):
    out = tmp_path / "hf"
    run_script("evaluate.py", "--model_name_or_path", tiny_vl_dir, "--backend", "hf", "--data_dir", fixtures,
               "--output_dir", str(out), "--benchmarks", "mmmu_val,mathvista_testmini,gsm8k", "--limit", "2",
               "--max_new_tokens", "12", "--think_budget", "4", "--num_samples", "1", "--temperature", "0")
    summary = json.load(open(out / "summary.json"))["benchmarks"]
    assert set(summary) == {"mmmu_val", "mathvista_testmini", "gsm8k"}
    n_images = {}
    for bench in summary:
        for r in map(json.loads, open(out / f"{bench}.jsonl")):
            assert "</think>" in r["responses"][0], (bench, r["responses"])  # forced exit closed the thinking
            assert r["tokens"][0] <= 12
            n_images[(bench, r["id"])] = r["n_images"]
            assert r["prompt"].count("<|image_pad|>") == r["n_images"]  # one placeholder run per image
    assert n_images[("mmmu_val", "validation_Clinical_Medicine_1")] == 2 and n_images[("gsm8k", "0")] == 0
    assert summary["gsm8k"]["forced_exit_rate"] > 0


def test_resume_after_sigkill_gives_the_same_summary(tiny_vl_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k.jsonl").write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"})
                                              + "\n" for i in range(8)))
    args = ["evaluate.py", "--model_name_or_path", tiny_vl_dir, "--backend", "hf", "--data_dir", str(data),
            "--benchmarks", "gsm8k", "--max_new_tokens", "16", "--think_budget", "6", "--items_per_call", "1"]
    run_script(*args, "--output_dir", str(tmp_path / "full"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args, "--output_dir", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl, deadline = killed / "gsm8k.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    with open(jsonl, "a") as f:
        f.write('{"id": "7", "responses": ["torn')  # as if killed mid-write
    run_script(*args, "--output_dir", str(killed))
    full = json.load(open(tmp_path / "full" / "summary.json"))["benchmarks"]
    resumed = json.load(open(killed / "summary.json"))["benchmarks"]
    assert resumed == full
    assert [json.loads(line)["responses"] for line in open(jsonl)] == \
        [json.loads(line)["responses"] for line in open(tmp_path / "full" / "gsm8k.jsonl")]


def test_reads_the_toy_data(toy_data_dir):
    """scripts/make_toy_data.py's eval files load as they are; the toy image set asks the text set's
    problems with the problem drawn instead of written."""
    cfg = ev.Config(data_dir=os.path.join(toy_data_dir, "eval"))
    for name in ("gsm8k", "mmlu_pro", "mmmu_val", "mmmu_health", "mathvista_testmini", "medqa_4opt"):
        assert ev.load_items(name, cfg), name
    text, image = ev.load_items("toy_text", cfg), ev.load_items("toy_image", cfg)
    assert len(text) == len(image) and [t["gold"] for t in text] == [i["gold"] for i in image]
    assert all(len(i["images"]) == 1 and not t["images"] for t, i in zip(text, image))


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (run in the vLLM venv)")
def test_vllm_backend_with_forced_exit(fixtures, tiny_text_dir, tmp_path):
    pytest.importorskip("vllm", reason="needs vllm (run in the vLLM venv)")
    out = tmp_path / "vllm"
    run_script("evaluate.py", "--model_name_or_path", tiny_text_dir, "--backend", "vllm", "--data_dir", fixtures,
               "--output_dir", str(out), "--benchmarks", "gsm8k,mmlu_pro,mathvista_testmini",
               "--max_new_tokens", "16", "--think_budget", "4", "--vllm_kv_cache_memory_bytes", str(256 << 20),
               env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    summary = json.load(open(out / "summary.json"))["benchmarks"]
    for bench in summary:
        for r in map(json.loads, open(out / f"{bench}.jsonl")):
            assert "</think>" in r["responses"][0] and r["tokens"][0] <= 16
            assert r["n_images"] == 0  # a text-only model gets the image items without their images


# ---- several GPUs: data-parallel engines, each on its own block of the items ---------------------------
def test_tensor_parallel_size_the_model_cannot_take_is_refused(tmp_path):
    """Qwen2.5-VL-7B has 28 attention heads: 8 GPUs per engine is refused before anything loads (no vLLM
    here), with the data-parallel alternative; 4 is fine. Both config.json shapes (text_config or not)."""
    for name, config in [("nested", {"text_config": {"num_attention_heads": 28}, "vision_config": {}}),
                         ("flat", {"num_attention_heads": 28})]:
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", **config}))
        common.check_tensor_parallel(str(model), 4)
        with pytest.raises(ValueError, match="28 attention heads.*--vllm_tensor_parallel_size 4 --num_engines 2"):
            ev.main(ev.Config(model_name_or_path=str(model), backend="vllm", vllm_tensor_parallel_size=8,
                              benchmarks=["gsm8k"], output_dir=str(tmp_path / "out")))


def test_shards_cover_every_item_once():
    for n_items in (0, 1, 5, 16):
        for n in (1, 2, 3, 8):
            blocks = [common.shard_bounds(f"{i}/{n}", n_items) for i in range(n)]
            assert [p for lo, hi in blocks for p in range(lo, hi)] == list(range(n_items))
    assert common.shard_path("out/gsm8k.jsonl", "1/4") == "out/gsm8k.shard-1-of-4.jsonl"
    with pytest.raises(ValueError, match="i/N"):
        common.shard_bounds("2/2", 5)


def test_two_engines_merge_to_one_engines_results(fixtures, tmp_path):
    """Replay backend, --num_engines 2 (worker processes on the CPU): the merged JSONL and the summary
    equal one engine's; a killed two-engine run (an item in the JSONL, one in a part file with a torn
    line) resumes without asking for finished items again."""
    one = replay_run(fixtures, tmp_path, tmp_path / "one")
    two = replay_run(fixtures, tmp_path, tmp_path / "two", cli=True, num_engines=2)
    assert two["benchmarks"] == one["benchmarks"]
    for bench in one["benchmarks"]:
        assert (tmp_path / "two" / f"{bench}.jsonl").read_text() == (tmp_path / "one" / f"{bench}.jsonl").read_text()
    assert not list((tmp_path / "two").glob("*.shard-*.jsonl"))  # merged, then removed
    assert (tmp_path / "two" / "shard-1-of-2.log").exists()

    out = tmp_path / "killed"
    out.mkdir()
    lines = (tmp_path / "one" / "gsm8k.jsonl").read_text().splitlines(keepends=True)
    (out / "gsm8k.jsonl").write_text(lines[0])
    (out / "gsm8k.shard-1-of-2.jsonl").write_text(lines[2] + lines[1][:30])  # item 2 done, item 1 torn
    finished = {("gsm8k", "0"), ("gsm8k", "2")}
    again = replay_run(fixtures, tmp_path, out, replay=[r for r in REPLAY if (r["benchmark"], r["id"]) not in finished],
                       cli=True, num_engines=2)
    assert again["benchmarks"] == one["benchmarks"]
    assert (out / "gsm8k.jsonl").read_text() == (tmp_path / "one" / "gsm8k.jsonl").read_text()


def test_two_hf_engines_give_one_engines_results(fixtures, tiny_vl_dir, tmp_path):
    """The real generation path: tiny Qwen2.5-VL, two hf engines on the CPU (text and image items),
    greedy with one row per generate call: the same rows and summary as one engine."""
    args = ["evaluate.py", "--model_name_or_path", tiny_vl_dir, "--backend", "hf", "--data_dir", fixtures,
            "--benchmarks", "gsm8k,mathvista_testmini", "--max_new_tokens", "12", "--think_budget", "4",
            "--items_per_call", "2", "--generation_batch_size", "1"]
    run_script(*args, "--output_dir", str(tmp_path / "one"))
    run_script(*args, "--output_dir", str(tmp_path / "two"), "--num_engines", "2")
    one, two = (json.load(open(tmp_path / d / "summary.json"))["benchmarks"] for d in ("one", "two"))
    assert two == one and set(one) == {"gsm8k", "mathvista_testmini"}
    for bench in one:
        assert (tmp_path / "two" / f"{bench}.jsonl").read_text() == (tmp_path / "one" / f"{bench}.jsonl").read_text()
