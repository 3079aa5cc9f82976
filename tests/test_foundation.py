"""The ground everything stands on: the tiny models load, generate and train like the real ones, and the
toy data has the real datasets' shapes, is deterministic and keeps its test problems out of training."""

import ast
import filecmp
import json
import os
import re

import pytest
import torch
from PIL import Image

from conftest import run_script

PROBLEM = re.compile(r"\b(\d\d) \+ (\d\d)\b")  # the two-digit problems, not the CoT digit sums
FORMAT_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


# ----------------------------------------------------------------------------- tiny models

def test_tiny_vl_model_chat_generate_and_train(tiny_vl_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_dir, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    image = Image.new("RGB", (168, 28), "white")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Solve the problem."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Solve the problem.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (inputs["input_ids"] == image_pad).sum().item() == 6  # 168x28 -> 12x2 patches -> 6 tokens

    model.eval()
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    model.train()
    labels = inputs["input_ids"].clone()
    labels[labels == image_pad] = -100
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "language_model" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # the image reaches the loss: the vision tower gets gradients too
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "visual" in n)


def test_tiny_text_model_loads_and_generates(tiny_text_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.head_dim == 64
    text = tok.apply_chat_template([{"role": "user", "content": "37 + 48"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or tok.eos_token_id in out[0].tolist()


def test_tokenizer_format_tags_and_digits(tiny_vl_dir):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tiny_vl_dir).tokenizer
    for tag in FORMAT_TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    ids = tok.encode("<think>\n37 + 48\n</think>\n<answer>85</answer>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\n37 + 48\n</think>\n<answer>85</answer>"
    assert len(tok.encode("1234567890", add_special_tokens=False)) == 10  # one token per digit


# ----------------------------------------------------------------------------- toy data shapes

def load(toy_data_dir, rel):
    from datasets import load_dataset

    return load_dataset("json", data_files=os.path.join(toy_data_dir, rel), split="train")


def check_image(folder, rel):
    assert isinstance(rel, str) and not os.path.isabs(rel), rel
    with Image.open(os.path.join(folder, rel)) as im:
        assert im.size == (168, 28) and im.mode == "RGB"
        assert im.getextrema()[0][0] < 128  # something dark was drawn


def test_openthoughts_shape(toy_data_dir):
    ds = load(toy_data_dir, "sft/openthoughts.jsonl")
    assert len(ds) > 100 and set(ds.column_names) == {"system", "conversations"}
    for row in ds.select(range(20)):
        user, assistant = row["conversations"]
        assert user["from"] == "user" and assistant["from"] == "assistant"
        a, b = map(int, PROBLEM.search(user["value"]).groups())
        v = assistant["value"]
        assert v.startswith("<|begin_of_thought|>") and v.endswith("<|end_of_solution|>")
        assert "<|end_of_thought|>" in v and "<|begin_of_solution|>" in v
        assert f"\\boxed{{{teacher_answer(a, b, v)}}}" in v.split("<|begin_of_solution|>")[1]


def teacher_answer(a, b, response):
    """The toy teacher's answer: a + b, or a + b - 10 where it forgot a carry (no "+ 1" in its tens line)."""
    carry = a % 10 + b % 10 >= 10
    slip = carry and f"Tens: {a // 10} + {b // 10} = " in response
    assert slip or not carry or f"Tens: {a // 10} + {b // 10} + 1 = " in response
    return a + b - 10 if slip else a + b


def slips(path):
    """(carry problems, slipped ones) over a CoT file."""
    carries = slipped = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            user, answer = (row["messages"][0]["content"], row["messages"][1]["content"]) if "messages" in row else \
                (row["conversations"][0]["value"], row["conversations"][1]["value"])
            a, b = map(int, PROBLEM.search(user).groups())
            carries += a % 10 + b % 10 >= 10
            slipped += teacher_answer(a, b, answer) != a + b
    return carries, slipped


def test_stage1_teacher_slips_only_where_asked(toy_data_dir, tmp_path):
    """Stage 1's teacher forgets the carry in --slip_rate of its carry problems (default 0.3), the same rows
    in both shapes; --slip_rate 0 writes only correct chains."""
    carries, slipped = slips(os.path.join(toy_data_dir, "sft/cot_messages.jsonl"))
    assert (carries, slipped) == slips(os.path.join(toy_data_dir, "sft/openthoughts.jsonl"))
    assert carries > 500 and abs(slipped / carries - 0.3) < 0.05
    run_script("scripts/make_toy_data.py", "--output_dir", str(tmp_path), "--slip_rate", "0", "--n_train", "500")
    carries, slipped = slips(str(tmp_path / "sft/cot_messages.jsonl"))
    assert carries > 100 and slipped == 0


def test_messages_shape(toy_data_dir):
    ds = load(toy_data_dir, "sft/messages.jsonl")
    assert set(ds.column_names) == {"messages", "images"}
    folder = os.path.join(toy_data_dir, "sft")
    n_image = 0
    for row in ds:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        # contents are lists of parts; the image items match the `images` column
        assert sum(p["type"] == "image" for p in user["content"]) == len(row["images"])
        assert all(p["type"] == "text" and p["text"] for p in assistant["content"])
        answer = assistant["content"][0]["text"]
        if row["images"]:
            n_image += 1
            if n_image < 20:
                check_image(folder, row["images"][0])
        if "<answer>" in answer:  # restate, then answer
            a, b = map(int, PROBLEM.search(answer).groups())
            assert answer == f"<think>\n{a} + {b}\n</think>\n<answer>{a + b}</answer>"
    assert 0 < n_image < len(ds)  # both text and image lessons


def test_messages_rows_render_with_the_image_in_place(toy_data_dir, tiny_vl_dir):
    """The image question renders exactly like the text question, with image tokens where the problem is."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    with open(os.path.join(toy_data_dir, "sft/messages.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    solve_with_image = next(r for r in rows if r["images"] and "<answer>" in r["messages"][1]["content"][0]["text"])
    text = processor.apply_chat_template(solve_with_image["messages"], tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>\nSolve the problem.\n(Answer with an integer.)<|im_end|>" in text


def test_cot_messages_shape(toy_data_dir):
    import rewards

    ds = load(toy_data_dir, "sft/cot_messages.jsonl")
    assert ds.column_names == ["messages"]
    for row in ds.select(range(20)):
        user, assistant = row["messages"]
        a, b = map(int, PROBLEM.search(user["content"]).groups())
        # asked exactly as rl.py / evaluate.py / distill.py ask with --prompt_template plain
        assert user["content"] == rewards.pose(f"{a} + {b}\nSolve the problem.\n(Answer with an integer.)", template="plain")
        assert assistant["content"].startswith(f"<think>\n{a} + {b}\n")  # restate first, as in stage 0
        assert rewards.extract_answer(assistant["content"]) == str(teacher_answer(a, b, assistant["content"]))


def test_pose_templates():
    """rewards.pose: 'plain' is the question alone (options listed below it); 'paper' is the paper's prompts."""
    import rewards

    q = "37 + 48\nSolve the problem."
    assert rewards.pose(q, template="plain") == q
    assert rewards.pose(q, None, "plain", kind="math") == q
    assert rewards.pose(q, ["85", "84"], "plain") == "37 + 48\nSolve the problem.\nA: 85\nB: 84"
    assert rewards.pose(q, {"A": "85", "B": "84"}, "plain") == rewards.pose(q, ["85", "84"], "plain")
    # the default is unchanged: the paper's training, math and MCQ prompts
    assert rewards.pose(q) == rewards.train_prompt(q)
    assert rewards.pose(q, kind="math") == rewards.math_prompt(q)
    assert rewards.pose(q, ["85", "84"], kind="math") == rewards.mcq_prompt(q, ["85", "84"])
    with pytest.raises(ValueError, match="template"):
        rewards.pose(q, template="short")
    with pytest.raises(ValueError, match="kind"):
        rewards.pose(q, kind="eval")


def test_orz_shape(toy_data_dir):
    with open(os.path.join(toy_data_dir, "rl/orz_math.json")) as f:
        rows = json.load(f)
    assert isinstance(rows, list) and len(rows) > 100
    for q, a in rows[:50]:
        assert q["from"] == "human" and isinstance(q["value"], str)
        assert a["from"] == "assistant" and set(a["ground_truth"]) == {"value"}
        x, y = map(int, PROBLEM.search(q["value"]).groups())
        assert a["ground_truth"]["value"] == str(x + y)


def test_gsm8k_and_toy_text_shape(toy_data_dir):
    for name in ("gsm8k", "toy_text"):
        ds = load(toy_data_dir, f"eval/{name}.jsonl")
        assert set(ds.column_names) == {"question", "answer"}
        for row in ds:
            a, b = map(int, PROBLEM.search(row["question"]).groups())
            assert row["answer"].rsplit("\n", 1)[1] == f"#### {a + b}"


def test_mmlu_pro_shape(toy_data_dir):
    ds = load(toy_data_dir, "eval/mmlu_pro.jsonl")
    assert {"question", "options", "answer", "answer_index", "category"} <= set(ds.column_names)
    assert "health" in ds["category"] and "math" in ds["category"]
    for row in ds:
        assert isinstance(row["options"], list) and 2 <= len(row["options"]) <= 10
        assert row["answer"] == "ABCDEFGHIJ"[row["answer_index"]]
        nums = list(map(int, re.findall(r"\d+", row["question"])))
        assert row["options"][row["answer_index"]] == str(sum(nums))


def test_mmmu_shape(toy_data_dir):
    ds = load(toy_data_dir, "eval/mmmu_val.jsonl")
    needed = {"id", "question", "options", "answer", "question_type"} | {f"image_{k}" for k in range(1, 8)}
    assert needed <= set(ds.column_names)
    assert set(ds["question_type"]) == {"multiple-choice", "open"}
    assert any(("Clinical_Medicine" in i or "Basic_Medical_Science" in i) for i in ds["id"])
    for row in ds:
        assert "<image 1>" in row["question"] and row["id"].startswith("validation_")
        assert isinstance(row["options"], str)
        options = ast.literal_eval(row["options"])  # stringified Python list, as in MMMU
        assert isinstance(options, list)
        if row["question_type"] == "multiple-choice":
            assert row["answer"] in "ABCD"[:len(options)]
        check_image(os.path.join(toy_data_dir, "eval"), row["image_1"])
        assert all(row[f"image_{k}"] is None for k in range(2, 8))


def test_mathvista_and_toy_image_shape(toy_data_dir):
    fields = {"pid", "question", "decoded_image", "choices", "unit", "precision", "answer", "question_type",
              "answer_type", "query"}
    for name in ("mathvista_testmini", "toy_image"):
        ds = load(toy_data_dir, f"eval/{name}.jsonl")
        assert fields <= set(ds.column_names)
        for row in ds:
            check_image(os.path.join(toy_data_dir, "eval"), row["decoded_image"])
            if row["question_type"] == "multi_choice":
                assert row["answer"] in row["choices"]  # the gold is the option text, not a letter
                assert "Choices:" in row["query"]
            else:
                assert row["question_type"] == "free_form" and row["choices"] is None
                assert row["answer_type"] == "integer" and row["answer"].isdigit()
    assert set(load(toy_data_dir, "eval/mathvista_testmini.jsonl")["question_type"]) == {"multi_choice", "free_form"}
    # toy_image shows the toy_text problems, only as pictures: same gold, row for row
    text, image = load(toy_data_dir, "eval/toy_text.jsonl"), load(toy_data_dir, "eval/toy_image.jsonl")
    assert [r.rsplit("#### ", 1)[1] for r in text["answer"]] == image["answer"]
    assert not any(PROBLEM.search(q) for q in image["question"])


def test_medqa_shape(toy_data_dir):
    ds = load(toy_data_dir, "eval/medqa_4opt.jsonl")
    assert {"question", "options", "answer", "answer_idx"} <= set(ds.column_names)
    for row in ds:
        assert set(row["options"]) == set("ABCD")
        assert row["options"][row["answer_idx"]] == row["answer"]


# ----------------------------------------------------------------------------- determinism and split

def test_toy_data_is_deterministic(toy_data_dir, tmp_path):
    run_script("scripts/make_toy_data.py", "--output_dir", str(tmp_path))

    def files(root):
        return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)
    assert files(toy_data_dir) == files(str(tmp_path))
    for rel in files(toy_data_dir):
        assert filecmp.cmp(os.path.join(toy_data_dir, rel), os.path.join(str(tmp_path), rel), shallow=False), rel
    other = tmp_path / "seed1"
    run_script("scripts/make_toy_data.py", "--output_dir", str(other), "--seed", "1")
    assert (other / "eval/toy_text.jsonl").read_bytes() != (tmp_path / "eval/toy_text.jsonl").read_bytes()


def problems_in(path):
    with open(path, encoding="utf-8") as f:
        return {tuple(sorted(map(int, m))) for m in PROBLEM.findall(f.read())}


def test_no_test_problem_in_training(toy_data_dir):
    train = set()
    for rel in ("sft/openthoughts.jsonl", "sft/cot_messages.jsonl", "sft/messages.jsonl", "rl/orz_math.json"):
        train |= problems_in(os.path.join(toy_data_dir, rel))
    evals = os.path.join(toy_data_dir, "eval")
    test = set()
    for name in ("toy_text", "gsm8k", "mmlu_pro", "medqa_4opt"):
        test |= problems_in(os.path.join(evals, f"{name}.jsonl"))
    assert len(test) >= 200 and len(train) > 1000
    assert not test & train  # as unordered pairs: b + a counts as a + b


def test_varied_question_forms(tmp_path):
    """--question_forms varied: training questions state the problem in every form (digits, words, ...), the
    chain always restates it as "a + b" with the question's numbers, the test set asks in digits only, and the
    direct-answer rows ask the same questions with no chain."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from make_toy_data import FORMS, number_words

    words = {number_words(n): n for n in range(10, 100)}
    assert len(words) == 90 and number_words(41) == "forty-one" and number_words(13) == "thirteen"
    run_script("scripts/make_toy_data.py", "--output_dir", str(tmp_path), "--question_forms", "varied",
               "--n_train", "300", "--n_base", "100", "--n_rl", "50", "--n_test", "20", "--n_bench", "4")
    cot = [json.loads(line) for line in open(tmp_path / "sft/cot_messages.jsonl", encoding="utf-8")]
    direct = [json.loads(line) for line in open(tmp_path / "sft/direct_messages.jsonl", encoding="utf-8")]
    seen = set()
    for row, plain in zip(cot, direct):
        question, chain = row["messages"][0]["content"].split("\n")[0], row["messages"][1]["content"]
        a, b = map(int, PROBLEM.search(chain).groups())  # the restatement
        stated = re.findall(r"\d\d", question) or [words[w] for w in re.findall(r"[a-z]+(?:-[a-z]+)?", question) if w in words]
        form = ("digits" if " + " in question else "words" if not re.search(r"\d", question) else
                "add_to" if question.startswith("Add") else "sum_of" if "sum" in question else "plus")
        seen.add(form)
        # "Add b to a." names b first; every other form names a first
        assert [int(x) for x in stated] == ([b, a] if form == "add_to" else [a, b]), (question, chain)
        assert plain["messages"][0] == row["messages"][0]
        assert "Ones:" in chain and "Ones:" not in plain["messages"][1]["content"]
        assert plain["messages"][1]["content"].startswith(f"<think>\n{a} + {b}\n</think>")
    assert seen == set(FORMS)
    for line in open(tmp_path / "eval/toy_text.jsonl", encoding="utf-8"):
        assert PROBLEM.match(json.loads(line)["question"])
