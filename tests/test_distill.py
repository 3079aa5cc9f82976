"""distill.py: a tiny teacher fine-tuned on the toy task (hf backend); rows verify, load as SFT data,
the stats add up, and a killed run resumes without duplicating or losing a row."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script

import common
import distill
import rewards

# Toy questions in two input shapes: Orz-math-57k pairs (open answers) and MedQA (4 options). Sums are
# 7 or 8 and the right option is A or B, so a few dozen steps teach a tiny teacher the format and a
# coin-flip answer: pass rates land between 0 and 1.
MATH = [(3, 4), (2, 5), (1, 6), (5, 3), (4, 4), (6, 2), (0, 7), (1, 7)]
MCQ = [(2, 5), (4, 4), (6, 1), (3, 5)]  # the first two are also math questions: decontamination drops them
N_MATH = 7  # --limit: the math runs distill the first 7 (of 8 after de-duplication)


def mcq_options(a: int, b: int) -> tuple[dict, str]:
    """Four numeric options; the sum is option A (sum 7) or B (sum 8)."""
    s, pos = a + b, (a + b) % 2 == 0
    values = [s - pos + k for k in range(4)]
    return {"ABCD"[k]: str(v) for k, v in enumerate(values)}, "ABCD"[pos]


def write_toy_questions(folder: str) -> tuple[str, str]:
    orz = [[{"from": "human", "value": f"What is {a} + {b}?"},
            {"from": "assistant", "ground_truth": {"value": str(a + b)}}] for a, b in MATH]
    orz.append(orz[0])  # a duplicate, dropped by --dedup
    orz_path = os.path.join(folder, "orz_math.json")
    with open(orz_path, "w") as f:
        json.dump(orz, f)
    medqa_path = os.path.join(folder, "medqa.jsonl")
    with open(medqa_path, "w") as f:
        for a, b in MCQ:
            options, letter = mcq_options(a, b)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "options": options,
                                "answer": options[letter], "answer_idx": letter}) + "\n")
    return orz_path, medqa_path


def toy_targets() -> list[tuple[str, str]]:
    """(user prompt, teacher response) for every toy question. The teacher writes its own style (no
    newlines, a bare option letter), which distill.py normalises to the paper's format; a fixed 3-token
    thinking and newline-free tags are learned in a few dozen steps (copying digits takes hundreds)."""
    rows = [(rewards.train_prompt(f"What is {a} + {b}?"), f"<think>The answer is</think><answer>{a + b}</answer>")
            for a, b in MATH]
    for a, b in MCQ:
        options, letter = mcq_options(a, b)
        rows.append((rewards.mcq_prompt(f"What is {a} + {b}?", options),
                     f"<think>The answer is</think><answer>{letter}</answer>"))
    return rows


def finetune_teacher(model_dir: str, out_dir: str, steps: int = 30, lr: float = 1e-3) -> str:
    """A few dozen plain AdamW steps on the toy rows (loss on the response), so most samples verify."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared busy cores one thread is several times faster than two
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqs = []
    for prompt, response in toy_targets():
        p = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                    add_generation_prompt=True)
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        r_ids = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
        seqs.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
    width = max(len(ids) for ids, _ in seqs)
    pad = tok.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in seqs])  # [rows, width]
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        b = slice(step % 2, None, 2)  # half the rows per step (every other one): cheaper, learns as fast
        loss = model(input_ids=input_ids[b], attention_mask=mask[b], labels=labels[b]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def teacher_dir(tiny_text_dir, tmp_path_factory):
    return finetune_teacher(tiny_text_dir, str(tmp_path_factory.mktemp("toy-teacher")))


@pytest.fixture(scope="session")
def toy_questions(tmp_path_factory):
    return write_toy_questions(str(tmp_path_factory.mktemp("toy-questions")))


def distill_args(teacher, dataset, output, *extra):
    return ["distill.py", "--backend", "hf", "--teacher", teacher, "--dataset", dataset, "--output", output,
            "--num_samples", "4", "--keep", "2", "--max_new_tokens", "32", "--temperature", "0.6",
            "--items_per_call", "1", *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- pure functions ---------------------------------------------------------------------------------
def test_normalize_question_shapes():
    orz = [{"from": "human", "value": "What is 1 + 1?"}, {"from": "assistant", "ground_truth": {"value": "2"}}]
    assert distill.normalize_question(orz, 3, "f") == {"id": "3", "question": "What is 1 + 1?", "gold": "2",
                                                       "options": None}
    medqa = {"question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "y", "answer_idx": "B"}
    assert distill.normalize_question(medqa, 0, "f")["gold"] == "B"
    mmlu = {"question_id": 70, "question": "Q?", "options": ["x", "y", "z", "N/A", "N/A"], "answer": "C"}
    q = distill.normalize_question(mmlu, 0, "f")
    assert q["options"] == {"A": "x", "B": "y", "C": "z"} and q["gold"] == "C" and q["id"] == "70"
    assert distill.normalize_question({"question": "Q", "answer": "so 6 #### 42"}, 0, "f")["gold"] == "42"
    with pytest.raises(ValueError, match=r"data.jsonl row 5: no 'question'"):
        distill.normalize_question({"prompt": "Q"}, 5, "data.jsonl")
    with pytest.raises(ValueError, match=r"row 1: field 'answer_idx'"):
        distill.normalize_question({"question": "Q", "options": {"A": "x"}, "answer_idx": "E"}, 1, "f")


def test_normalize_response_markers():
    fmt = rewards.format_response("2 + 2 = 4", "4")
    assert distill.normalize_response("<think>2 + 2 = 4</think>\n<answer>4</answer>", None) == fmt
    # the chat template opened <think> itself: only </think> is generated (QwQ-32B, R1)
    assert distill.normalize_response("2 + 2 = 4\n</think>\n\nSo the result is \\boxed{4}.", None) == fmt
    ot = "<|begin_of_thought|>2 + 2 = 4<|end_of_thought|>\n<|begin_of_solution|>\\boxed{4}<|end_of_solution|>"
    assert distill.normalize_response(ot, None) == fmt
    opts = {"A": "3", "B": "4"}
    assert distill.normalize_response("<think>2 + 2 = 4</think> \\boxed{B}", opts) == \
        rewards.format_response("2 + 2 = 4", "B: 4")
    assert distill.normalize_response("<answer>4</answer>", None) is None  # no thinking
    assert distill.normalize_response("<think><think>4</think><answer>4</answer>", None) is None  # stray tag
    assert distill.normalize_response("<think>hmm</think>\nNot sure.\nMany things.", None) is None  # no answer


def test_dedup_key_and_ngrams():
    a = {"question": "What is  the Dose?", "options": None}
    assert distill.question_key(a) == distill.question_key({"question": "what is the dose", "options": None})
    assert distill.question_key({"question": "Q", "options": {"A": "x"}}) != \
        distill.question_key({"question": "Q", "options": {"A": "y"}})
    text = " ".join(f"w{k}" for k in range(20))
    assert distill.ngrams("Other words. " + text, 13) & distill.ngrams(text + " tail", 13)
    assert not distill.ngrams(" ".join(f"w{k}" for k in range(12)), 13) & distill.ngrams(text, 13)


def test_resume_repairs_torn_and_unfinished(tmp_path):
    out = str(tmp_path / "d.jsonl")
    with open(out, "w") as f:
        f.write(json.dumps({"question_id": "0", "sample": 1}) + "\n")
        f.write(json.dumps({"question_id": "1", "sample": 0}) + "\n")  # question 1 has no done record
        f.write('{"question_id": "1", "sam')  # torn by a kill
    with open(out + ".done", "w") as f:
        f.write(json.dumps({"question_id": "0", "kept": 1}) + "\n" + '{"question_')
    done, dropped = distill.resume(out)
    assert list(done) == ["0"] and dropped == 2
    assert read_jsonl(out) == [{"question_id": "0", "sample": 1}]
    assert read_jsonl(out + ".done") == [{"question_id": "0", "kept": 1}]


def test_openai_client_retries_then_succeeds(monkeypatch):
    """A loopback server that answers 503 twice, then a completion: the client retries with back-off,
    sends the key from the environment variable, and returns the reply; a 400 is not retried."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body["model"]))
            code = 400 if body["model"] == "bad" else 503 if len(seen) <= 2 else 200
            reply = {"choices": [{"message": {"content": "hi", "reasoning_content": "think"},
                                  "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
            data = json.dumps(reply if code == 200 else {"error": "busy"}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(distill, "backoff_seconds", lambda attempt: 0.01)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    base = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        reply = distill.openai_chat(base, "sk-test", {"model": "m"}, timeout=10, max_retries=3)
        assert len(seen) == 3 and seen[-1] == ("/v1/chat/completions", "Bearer sk-test", "m")
        assert distill.choice_text(reply["choices"][0]) == "<think>\nthink\n</think>\nhi"
        with pytest.raises(RuntimeError, match="HTTP 400"):
            distill.openai_chat(base, "", {"model": "bad"}, timeout=10, max_retries=3)
        assert len(seen) == 4 and seen[-1][1] is None  # not retried; no key, no header
    finally:
        httpd.shutdown()


# ---- end to end with the hf backend -----------------------------------------------------------------
def check_output(output, teacher, n_questions, mcq=False):
    """Rows verify, load in sft.py, have their metadata once each; the stats add up."""
    import common
    import sft

    rows = read_jsonl(output)
    stats = json.load(open(output + ".stats.json"))
    done = read_jsonl(output + ".done")
    sft_rows, base = common.load_rows(output)  # sft.py's loader
    assert len(sft_rows) == len(rows)
    for r, sft_row in zip(rows, sft_rows):
        response = r["messages"][1]["content"]
        options = mcq_options(*MCQ[int(r["question_id"])])[0] if mcq else None
        assert rewards.accuracy_reward([response], [r["gold"]], options=[options]) == [1.0]
        assert rewards.format_reward([response]) == [1.0]  # normalised to the paper's format
        assert sft.row_to_conversation(sft_row, base, False) == (r["messages"], [])
        assert r["teacher"] == teacher and 0 < r["pass_rate"] <= 1 and r["completion_tokens"] > 0
    keys = [(r["question_id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert stats["questions_done"] == len(done) == n_questions
    assert sum(stats["pass_rate_histogram"].values()) == stats["questions_scored"] == n_questions
    assert stats["samples"] == 4 * n_questions
    assert stats["samples_correct"] == sum(int(k.split("/")[0]) * v for k, v in stats["pass_rate_histogram"].items())
    assert stats["rows_kept"] == len(rows) == sum(d["kept"] for d in done) == stats["kept_tokens"]["count"]
    assert all(d["kept"] == min(2, d["num_correct"]) for d in done)  # --keep 2
    for d in done:  # pass rate on every row = verified samples / samples of its question
        assert all(r["pass_rate"] == d["num_correct"] / 4 for r in rows if r["question_id"] == d["question_id"])
    return rows, stats


@pytest.fixture(scope="module")
def math_run(teacher_dir, toy_questions, tmp_path_factory):
    """An uninterrupted run on the Orz-shaped questions (also the reference for the kill test)."""
    out = str(tmp_path_factory.mktemp("math-run") / "math.jsonl")
    run_script(*distill_args(teacher_dir, toy_questions[0], out, "--limit", str(N_MATH)))
    return out


def test_distill_hf_end_to_end(teacher_dir, toy_questions, math_run, tmp_path):
    orz, medqa = toy_questions
    rows, stats = check_output(math_run, teacher_dir, N_MATH)
    assert stats["duplicates_dropped"] == 1 and stats["questions_in_dataset"] == len(MATH) + 1
    assert stats["questions_selected"] == N_MATH and stats["pass_rate"] > 0 and stats["rows_kept"] > 0
    # MedQA shape, several questions per generate() call, decontaminated against the math questions
    # ("What is 2 + 5?" is 4 words: with --ngram 4 the shared questions overlap)
    out_mcq = str(tmp_path / "mcq.jsonl")
    run_script(*distill_args(teacher_dir, medqa, out_mcq, "--items_per_call", "4",
                             "--decontaminate", orz, "--ngram", "4"))
    rows, stats = check_output(out_mcq, teacher_dir, 2, mcq=True)
    assert stats["contaminated_dropped"] == 2 and stats["pass_rate"] > 0
    assert {r["question_id"] for r in rows} <= {"2", "3"}
    for r in rows:
        options = mcq_options(*MCQ[int(r["question_id"])])[0]
        assert r["messages"][0]["content"] == rewards.mcq_prompt(f"What is {MCQ[int(r['question_id'])][0]} + "
                                                                 f"{MCQ[int(r['question_id'])][1]}?", options)
        assert r["messages"][1]["content"].endswith(f"<answer>{r['gold']}: {options[r['gold']]}</answer>")
    # decontaminating against the same questions drops them all (then no teacher is even loaded)
    out = str(tmp_path / "c.jsonl")
    stats = distill.main(distill.Config(teacher="unused", dataset=orz, output=out, backend="hf",
                                        decontaminate=[orz]))
    assert stats["contaminated_dropped"] == len(MATH) and stats["rows_kept"] == stats["questions_done"] == 0
    assert json.load(open(out + ".stats.json"))["questions_selected"] == 0


def test_distill_resumes_after_sigkill(teacher_dir, toy_questions, math_run, tmp_path):
    orz, killed = toy_questions[0], str(tmp_path / "killed.jsonl")
    args = distill_args(teacher_dir, orz, killed, "--limit", str(N_MATH))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once a few questions are done
        if os.path.exists(killed + ".done") and len(open(killed + ".done").readlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    n_done = len(read_jsonl(killed + ".done"))
    assert 2 <= n_done < N_MATH, "the kill should land mid-run"
    with open(killed, "a") as f:  # as if the kill had also cut a row in half
        f.write('{"messages": [{"role": "user", "con')
    run_script(*args)
    rows_full, rows_resumed = read_jsonl(math_run), read_jsonl(killed)
    key = lambda r: (r["question_id"], r["sample"])  # noqa: E731
    assert sorted(rows_resumed, key=key) == sorted(rows_full, key=key)  # each row once, none lost
    check_output(killed, teacher_dir, N_MATH)


# ---- several GPUs: data-parallel engines, each on its own block of the questions ------------------------
def test_merge_shards_folds_parts_in_question_order(tmp_path):
    """Engines' part files (one torn, one with an unfinished question) merge into the output in question
    order; only finished questions move; the parts are gone; a second merge changes nothing."""
    out = str(tmp_path / "d.jsonl")
    questions = [{"id": str(i)} for i in range(4)]
    row = lambda q, j: json.dumps({"question_id": q, "sample": j}) + "\n"  # noqa: E731
    done = lambda q: json.dumps({"question_id": q, "kept": 1}) + "\n"  # noqa: E731
    files = {out: (row("0", 0), done("0")),
             common.shard_path(out, "0/2"): (row("1", 2), done("1")),
             common.shard_path(out, "1/2"): (row("3", 0) + row("2", 1) + row("2", 0) + '{"quest',
                                              done("3") + done("2"))}
    for path, (rows, dones) in files.items():
        open(path, "w").write(rows)
        open(path + ".done", "w").write(dones)
    distill.merge_shards(out, questions)
    want = [{"question_id": q, "sample": j} for q, j in [("0", 0), ("1", 2), ("2", 0), ("2", 1), ("3", 0)]]
    assert read_jsonl(out) == want
    assert [d["question_id"] for d in read_jsonl(out + ".done")] == ["0", "1", "2", "3"]
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "d.jsonl.done"]
    distill.merge_shards(out, questions)
    assert read_jsonl(out) == want


def test_two_engines_give_one_engines_rows(teacher_dir, toy_questions, math_run, tmp_path):
    """--num_engines 2 (hf, two worker processes on the CPU): the same rows, done records and statistics
    as one engine, in the same order: question p's samples keep their seed in either engine."""
    out = str(tmp_path / "two.jsonl")
    proc = run_script(*distill_args(teacher_dir, toy_questions[0], out, "--limit", str(N_MATH),
                                    "--num_engines", "2"))
    assert "engine 1/2" in proc.stdout
    assert read_jsonl(out) == read_jsonl(math_run)
    assert read_jsonl(out + ".done") == read_jsonl(math_run + ".done")
    stats, ref = (json.load(open(p + ".stats.json")) for p in (out, math_run))
    assert {k: v for k, v in stats.items() if k != "config"} == {k: v for k, v in ref.items() if k != "config"}
    assert sorted(os.listdir(tmp_path)) == ["two.jsonl", "two.jsonl.done", "two.jsonl.stats.json",
                                            "two.shard-0-of-2.log", "two.shard-1-of-2.log"]
    # a rerun finds everything done and starts no engine
    proc = run_script(*distill_args(teacher_dir, toy_questions[0], out, "--limit", str(N_MATH),
                                    "--num_engines", "2"))
    assert "0 to go" in proc.stdout and "engine 0/2" not in proc.stdout
