"""sft.py: supervised tokens, packing isolation, data errors, schedule, and short real training runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script

import common
import rewards
import sft

THOUGHT = "<|begin_of_thought|>\n\n{a} + {b}\nOnes first.\nSo {a} + {b} = {c}.\n\n<|end_of_thought|>"
SOLUTION = "<|begin_of_solution|>\n\n\\boxed{{{c}}}\n\n<|end_of_solution|>"


def openthoughts_row(a, b):
    value = THOUGHT.format(a=a, b=b, c=a + b) + "\n\n" + SOLUTION.format(c=a + b)
    return {"system": "Your role as an assistant involves thoroughly exploring questions.",
            "conversations": [{"from": "user", "value": f"{a} + {b}"}, {"from": "assistant", "value": value}]}


def draw(path, text):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (168, 28), "white")
    ImageDraw.Draw(im).text((40, 8), text, fill="black")
    im.save(path)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Small files in the two shapes sft.py reads: OpenThoughts (text) and chat messages with images."""
    d = tmp_path_factory.mktemp("sft-data")
    with open(d / "openthoughts.jsonl", "w") as f:
        for k in range(64):
            f.write(json.dumps(openthoughts_row(10 + k, 20 + 2 * k)) + "\n")
    os.makedirs(d / "images")
    with open(d / "messages.jsonl", "w") as f:
        for k in range(32):
            a, b = 11 + k, 30 + k
            if k % 2:
                draw(d / "images" / f"{k}.png", f"{a} + {b}")
                row = {"messages": [{"role": "user", "content": "Read the problem."},
                                    {"role": "assistant", "content": f"{a} + {b}"}], "images": [f"images/{k}.png"]}
            else:
                row = {"messages": [{"role": "user", "content": f"{a} + {b}"},
                                    {"role": "assistant", "content": rewards.format_response(f"{a} + {b}", str(a + b))}]}
            f.write(json.dumps(row) + "\n")
    return d


def tokenize(processor, messages, images=(), model=None):
    tok = processor.tokenizer
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    rope = common.make_rope_index(model, model.config.image_token_id) if model is not None else None
    return sft.tokenize_example(messages, list(images), processor, tok, header, tok.convert_tokens_to_ids("<|im_end|>"), rope)


def supervised_text(processor, ex):
    ids = [t for t in ex["targets"] if t != -100]
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def test_supervised_tokens_are_exactly_the_assistant_turns(tiny_vl_dir, tmp_path):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "37 + 48"},
                {"role": "assistant", "content": "<think>\n7 + 8 = 15\n</think>\n<answer>85</answer>"},
                {"role": "user", "content": "and 12 - 5?"},
                {"role": "assistant", "content": "7"}]
    ex = tokenize(processor, messages)
    assert supervised_text(processor, ex) == messages[2]["content"] + "<|im_end|>" + "7<|im_end|>"
    # targets are next-token targets: where supervised, targets[t] == ids[t + 1]
    assert all(t == -100 or t == ex["ids"][i + 1] for i, t in enumerate(ex["targets"]))
    # an image row: the user's image tokens are never supervised
    draw(tmp_path / "x.png", "1 + 2")
    conv, images = sft.row_to_conversation({"messages": [{"role": "user", "content": "Read the problem."},
                                                         {"role": "assistant", "content": "1 + 2"}],
                                            "images": ["x.png"]}, str(tmp_path), False)
    assert conv[0]["content"][0] == {"type": "image"}
    ex = tokenize(processor, conv, images)
    assert ex["ids"].count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 6
    assert supervised_text(processor, ex) == "1 + 2<|im_end|>"


def test_openthoughts_row_uses_the_paper_format():
    row = openthoughts_row(37, 48)
    messages = sft.openthoughts_to_messages(row, keep_system_prompt=False)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == rewards.train_prompt("37 + 48")
    assert messages[1]["content"] == rewards.format_response("37 + 48\nOnes first.\nSo 37 + 48 = 85.", "\\boxed{85}")
    kept = sft.openthoughts_to_messages(row, keep_system_prompt=True)
    assert kept[0] == {"role": "system", "content": row["system"]}


def test_packed_logits_equal_unpacked_per_example(tiny_vl_dir, tmp_path):
    """Examples packed in one row (text and image, M-RoPE) get the same logits as each one alone."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    draw(tmp_path / "a.png", "12 + 34")
    draw(tmp_path / "b.png", "56 + 7")
    convs = [
        ([{"role": "user", "content": "12 + 34"}, {"role": "assistant", "content": "<think>\nones\n</think>\n<answer>46</answer>"}], []),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the problem."}]},
          {"role": "assistant", "content": "12 + 34"}], [str(tmp_path / "a.png")]),
        ([{"role": "user", "content": "9 + 9 + 9 + 9"}, {"role": "assistant", "content": "36"}], []),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Solve."}]},
          {"role": "assistant", "content": "63"}], [str(tmp_path / "b.png")]),
    ]
    examples = [tokenize(processor, m, im, model) for m, im in convs]
    pad = processor.tokenizer.pad_token_id

    def run(exs, rows):
        batch = sft.collate(exs, rows, pad, mrope=True)
        pixels = dict(processor.image_processor(images=[common.open_image(i) for i in batch["images"]], return_tensors="pt")) if batch["images"] else {}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None, use_cache=False, **pixels).logits
        return batch, logits

    packed, logits = run(examples, [[0, 1, 2, 3]])
    assert packed["input_ids"].shape[0] == 1 and packed["padding_fraction"] == 0.0
    start = 0
    for ex in examples:
        n = len(ex["ids"])
        _, alone = run([ex], [[0]])
        torch.testing.assert_close(logits[0, start:start + n], alone[0], atol=2e-5, rtol=1e-4)
        start += n
    # the batch loss (sum over supervised tokens) is the same packed, padded, or one example at a time,
    # and the chunked head (8 tokens a chunk here) equals full [rows, width, vocab] logits + cross-entropy
    full = torch.nn.functional.cross_entropy(logits[0], packed["targets"][0], ignore_index=-100, reduction="sum")
    model = common.LogProbModel(model, chunk_size=8)
    with torch.no_grad():
        total_packed = sft.token_loss_sum(model, packed, dict(processor.image_processor(images=[common.open_image(i) for i in packed["images"]], return_tensors="pt")))
        padded = sft.collate(examples, [[0], [1], [2], [3]], pad, mrope=True)
        assert padded["padding_fraction"] > 0
        total_padded = sft.token_loss_sum(model, padded, dict(processor.image_processor(images=[common.open_image(i) for i in padded["images"]], return_tensors="pt")))
    torch.testing.assert_close(total_packed, total_padded, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(total_packed, full, atol=1e-5, rtol=1e-6)
    model = model.model
    # sanity: the same row without per-example positions lets the second example see the first
    b, lg = run([examples[0], examples[2]], [[0, 1]])
    with torch.no_grad():
        leaky = model(input_ids=b["input_ids"], use_cache=False).logits
    n0 = len(examples[0]["ids"])
    assert not torch.allclose(leaky[0, n0:], lg[0, n0:], atol=1e-3)


def test_pack_rows_never_exceeds_capacity():
    lengths = [5, 9, 3, 7, 1, 9, 2]
    rows = common.pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 36 tokens cannot fit in fewer than 4 rows of 10 here (two 9s, a 7, ...)


def test_malformed_rows_name_file_row_and_field(tiny_text_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [openthoughts_row(1, 2) for _ in range(8)]
    rows[5] = {"conversations": [{"from": "user", "value": "1 + 2"}, {"from": "assistant", "value": "no markers here"}]}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["sft.py", "--model_name_or_path", tiny_text_dir, "--dataset", str(bad), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--per_device_batch_size", "2", "--gradient_checkpointing", "false"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{bad} row 5 (line 6)" in proc.stderr and "conversations[1].value" in proc.stderr
    run_script(*args, "--on_bad_row", "skip")
    first = json.loads(open(tmp_path / "out" / "log.jsonl").readline())
    assert first["data/bad_rows"] == 1 and first["data/rows"] == 8


def test_lr_schedules():
    cfg = sft.Config(learning_rate=1e-5)
    assert [sft.lr_at(s, 40, 10, cfg) for s in (0, 9, 10, 25, 39)] == pytest.approx([1e-5, 1e-5, 8e-6, 6.4e-6, 5.12e-6])
    cos = sft.Config(learning_rate=1.0, lr_scheduler="cosine", warmup_ratio=0.1)
    assert sft.lr_at(0, 100, 10, cos) == pytest.approx(0.1) and sft.lr_at(9, 100, 10, cos) == pytest.approx(1.0)
    assert sft.lr_at(10, 100, 10, cos) == pytest.approx(1.0) and sft.lr_at(55, 100, 10, cos) == pytest.approx(0.5)
    lin = sft.Config(learning_rate=1.0, lr_scheduler="linear")
    assert sft.lr_at(50, 100, 10, lin) == pytest.approx(0.5)


def test_global_batches_cover_each_epoch_once():
    seen = [i for s in range(5) for i in sft.global_batch_indices(s, 23, 4, seed=0)]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 20  # 5 steps per epoch, tail of 3 dropped
    assert sft.global_batch_indices(5, 23, 4, 0) != sft.global_batch_indices(0, 23, 4, 0)  # reshuffled


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_training_lowers_loss_and_the_saved_model_generates(tiny_vl_dir, sft_data, tmp_path):
    """Image and text rows train (vision unfrozen, like the toy's stage 0); the folder reloads and generates."""
    out = str(tmp_path / "run")
    run_script("sft.py", "--model_name_or_path", tiny_vl_dir, "--dataset", str(sft_data / "messages.jsonl"),
               "--output_dir", out, "--max_steps", "30", "--per_device_batch_size", "8", "--learning_rate", "2e-3",
               "--freeze_vision_tower", "false", "--gradient_checkpointing", "false", "--save_steps", "0",
               env={"OMP_NUM_THREADS": "1"})
    log = read_log(out)
    assert len(log) == 30 and {"loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction"} <= set(log[0])
    assert sum(r["loss"] for r in log[-5:]) / 5 < 0.6 * sum(r["loss"] for r in log[:3]) / 3
    assert os.path.isdir(os.path.join(out, "checkpoint-30")) and not os.path.exists(os.path.join(out, "checkpoint-30.tmp"))
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    before = AutoModelForImageTextToText.from_pretrained(tiny_vl_dir)
    assert not torch.equal(model.model.visual.blocks[0].mlp.up_proj.weight, before.model.visual.blocks[0].mlp.up_proj.weight)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the problem."}]}],
                                         tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[common.open_image(str(sft_data / "images" / "1.png"))], return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_frozen_vision_by_default(tiny_vl_dir, sft_data, tmp_path):
    out = str(tmp_path / "run")
    run_script("sft.py", "--model_name_or_path", tiny_vl_dir, "--dataset", str(sft_data / "messages.jsonl"),
               "--output_dir", out, "--max_steps", "2", "--per_device_batch_size", "8", "--learning_rate", "1e-2",
               "--save_steps", "0", "--save_dtype", "float32", env={"OMP_NUM_THREADS": "1"})
    from safetensors.torch import load_file
    new, old = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(tiny_vl_dir, "model.safetensors"))
    vision = [k for k in new if "visual" in k and "merger" not in k]
    assert vision and all(torch.equal(new[k], old[k]) for k in vision)
    assert any(not torch.equal(new[k], old[k]) for k in new if "merger" in k)  # the projector trains (image rows)
    assert any(not torch.equal(new[k], old[k]) for k in new if "layers.0.mlp" in k)


def train_args(model_dir, data, out, *extra):
    return ["sft.py", "--model_name_or_path", model_dir, "--dataset", str(data), "--output_dir", out,
            "--learning_rate", "1e-3", "--gradient_checkpointing", "false", "--lr_scheduler", "cosine", *extra]


def test_two_processes_match_one_with_the_same_global_batch(tiny_text_dir, sft_data, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    data = sft_data / "openthoughts.jsonl"
    env = {"OMP_NUM_THREADS": "1"}
    run_script(*train_args(tiny_text_dir, data, one, "--max_steps", "4", "--per_device_batch_size", "4", "--save_steps", "0",
                           "--save_dtype", "float32"), env=env)
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               *train_args(tiny_text_dir, data, two, "--max_steps", "4", "--per_device_batch_size", "1",
                           "--gradient_accumulation_steps", "2", "--save_steps", "0", "--save_dtype", "float32"), env=env)
    a, b = read_log(one), read_log(two)
    assert [r["examples"] for r in b] == [4] * 4 and [r["supervised_tokens"] for r in a] == [r["supervised_tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 and abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-4
    from safetensors.torch import load_file
    wa, wb = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_text_dir, sft_data, tmp_path):
    data = sft_data / "openthoughts.jsonl"
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    steps = ("--max_steps", "12", "--per_device_batch_size", "8", "--save_steps", "4",  # crosses an epoch (8 steps)
             "--save_dtype", "float32")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_script(*train_args(tiny_text_dir, data, ref, *steps), env=env)
    proc = subprocess.Popen([sys.executable, *train_args(tiny_text_dir, data, cut, *steps)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(cut, "checkpoint-4")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(cut, "checkpoint-12")), "the run finished before it could be killed"
    run_script(*train_args(tiny_text_dir, data, cut, *steps, "--resume"), env=env)
    a, b = read_log(ref), read_log(cut)
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 and ra["lr"] == rb["lr"]
    from safetensors.torch import load_file
    wa, wb = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_load_rows_reads_parquet_and_save_to_disk(sft_data, tmp_path):
    import datasets
    rows, base = common.load_rows(str(sft_data / "openthoughts.jsonl"))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "ot.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for path in ("ot.parquet", "saved", "saved_dict"):
        got, _ = common.load_rows(str(tmp_path / path))
        assert len(got) == 64 and sft.row_to_conversation(got[3], "", False) == sft.row_to_conversation(rows[3], "", False)
