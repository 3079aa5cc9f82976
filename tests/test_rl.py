"""rl.py: the GRPO math against hand-computed values, batching/log-probs against plain forwards, and short
end-to-end runs (single process, resume, torchrun with 2 processes) on the tiny models."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import common
import rl
from conftest import ROOT, run_script

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- math
def test_group_advantages_hand_values():
    adv = rl.group_advantages([1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1], group_size=4)
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert adv[:4].tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: exactly zero
    # group 3: mean 0.5, unbiased std sqrt(4 * 0.25 / 3)
    s = math.sqrt(1 / 3)
    assert adv[8:].tolist() == pytest.approx([-0.5 / (s + 1e-4), 0.5 / (s + 1e-4)] * 2)
    dr = rl.group_advantages([1, 0, 0, 0, 0.3, 0.3, 0.3, 0.3], group_size=4, scale_by_std=False)
    assert dr.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert rl.group_advantages([0.1, 0.1, 0.1], 3).tolist() == [0.0, 0.0, 0.0]
    assert rl.group_advantages([1.0, 0.0], 1).tolist() == [0.0, 0.0]  # a group of one has no signal


def test_policy_loss_hand_values():
    ratio = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]])
    old = logp - ratio.log()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, stats = rl.policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # row A=+1: -min(1.5, 1.28) = -1.28 (clipped), -min(0.5, 0.8) = -0.5 (not clipped: A > 0), masked
    # row A=-1: -min(-1.5, -1.28) = 1.5, -min(-0.5, -0.8) = 0.8 (clipped), -min(-1, -1) = 1
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.5 + 0.8 + 1.0) / 5)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.0) / 5)
    assert stats["kl"] == 0.0
    # k3 KL with ref = pi * 2 on every token: 2 - ln 2 - 1
    loss_kl, stats = rl.policy_loss(logp, old, adv, mask, None, 0.2, 0.28, ref_logprobs=logp + LN2, beta=0.1)
    assert stats["kl"] == pytest.approx(1 - LN2)
    assert loss_kl.item() == pytest.approx(loss.item() + 0.1 * (1 - LN2), abs=1e-6)
    # per-token advantages [B, T] (how rl.py applies the TIS weights) equal the [B] form when constant
    loss_tok, _ = rl.policy_loss(logp, old, adv[:, None].expand(2, 3), mask)
    assert loss_tok.item() == pytest.approx(loss.item())


def test_policy_loss_on_policy_gradient():
    # on-policy (old = current, detached): d loss / d logp = -A * mask / number of masked tokens
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    loss, stats = rl.policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / 6)
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)


def test_microbatch_normalisation_is_the_step_token_mean():
    """Micro-batches on 2 ranks with uneven token counts give the full batch's token-level loss and
    gradient; a mean of micro-batch means would not."""
    torch.manual_seed(0)
    B, T = 7, 6
    logp = torch.randn(B, T, requires_grad=True)
    old = (logp + 0.3 * torch.randn(B, T)).detach()
    adv = torch.randn(B)
    lengths = [6, 1, 3, 5, 2, 6, 4]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    full, _ = rl.policy_loss(logp, old, adv, mask)
    g_full = torch.autograd.grad(full, logp)[0]

    ranks = [[slice(0, 1), slice(1, 4)], [slice(4, 6), slice(6, 7)]]  # rank -> micro-batches
    step_tokens = mask.sum().item()
    per_rank, means = [], []
    for mbs in ranks:
        total = 0
        for sl in mbs:
            # policy_loss is told the step's token count (over both ranks / 2, as gradients are averaged)
            l, _ = rl.policy_loss(logp[sl], old[sl], adv[sl], mask[sl], num_tokens=step_tokens / 2)
            means.append(rl.policy_loss(logp[sl], old[sl], adv[sl], mask[sl])[0])
            total = total + l
        per_rank.append(total)
    ddp = sum(per_rank) / 2  # what FSDP's / DDP's gradient averaging amounts to
    assert ddp.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(ddp, logp)[0], g_full, atol=1e-7)
    assert abs(sum(means).item() / len(means) - full.item()) > 1e-3  # the naive mean differs


def test_tis_weights_and_lr_factor():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.0, -1.0 - LN2, -1.0 + LN2]])
    assert rl.tis_weights(old, sampler, cap=1.5)[0].tolist() == pytest.approx([1.0, 1.5, 0.5])
    assert [rl.lr_factor(u, 4, 20) for u in (0, 1, 3, 4, 19)] == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0])
    assert rl.lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- data
def test_normalize_rows(tmp_path):
    orz = [{"from": "human", "value": "What is 2 + 3?"}, {"from": "assistant", "ground_truth": {"value": "5"}}]
    assert rl.normalize_row(orz, 0, "orz.json") == {"question": "What is 2 + 3?", "answer": "5", "options": None, "images": []}
    medqa = {"question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "y", "answer_idx": "B"}
    assert rl.normalize_row(medqa, 1, "medqa.jsonl")["answer"] == "B"
    assert rl.normalize_row({"question": "Q", "answer": "Natalia ... #### 72"}, 2, "gsm8k.jsonl")["answer"] == "72"
    path = tmp_path / "d.jsonl"
    path.write_text("{}")
    row = rl.normalize_row({"question": "Q", "answer": "1", "images": ["images/a.png"]}, 3, str(path), str(tmp_path))
    assert row["images"] == [str(tmp_path / "images" / "a.png")]
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 7: missing field 'question'"):
        rl.normalize_row({"prompt": "Q", "answer": "1"}, 7, "bad.jsonl")
    with pytest.raises(ValueError, match=r"orz\.json: row 4: Orz-math pair"):
        rl.normalize_row([{"from": "human", "value": "Q"}], 4, "orz.json")


def test_vision_parts_are_frozen_the_same_way_as_in_sft():
    """One rule for every stage: a LLaVA-style tower frozen in SFT must not train in RL (rl.py used to
    freeze only Qwen's `visual.`)."""
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("vision_tower", "multi_modal_projector", "language_model"):
                setattr(self, name, torch.nn.Linear(2, 2))
    for freeze_projector in (False, True):
        m = Toy()
        common.freeze_vision(m, freeze_vision_tower=True, freeze_projector=freeze_projector)
        assert [n for n, p in m.named_parameters() if p.requires_grad] == [
            "multi_modal_projector.weight", "multi_modal_projector.bias"] * (not freeze_projector) + [
            "language_model.weight", "language_model.bias"]
    assert rl.Config.__dataclass_fields__["freeze_projector"].default is False  # the same flag names
    assert "freeze_merger" not in rl.Config.__dataclass_fields__


def test_an_earlier_runs_folder_is_refused_without_resume(tiny_vl_dir, tmp_path):
    """A second run into a folder with checkpoints must not append to the first run's log/samples."""
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "completions.jsonl").write_text('{"step": 1}\n')
    cmd = [sys.executable, "rl.py", "--model_name_or_path", tiny_vl_dir, "--dataset", "unused.json",
           "--output_dir", str(out), "--backend", "hf"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ENV})
    assert proc.returncode != 0 and "holds checkpoints of an earlier run" in proc.stderr
    assert (out / "completions.jsonl").read_text() == '{"step": 1}\n'


def test_step_prompt_indices_cover_each_epoch_once():
    seen = sum((rl.step_prompt_indices(s, 12, 4, seed=3) for s in range(3)), [])
    assert sorted(seen) == list(range(12))
    assert rl.step_prompt_indices(3, 12, 4, 3) != rl.step_prompt_indices(0, 12, 4, 3)  # a new shuffle


# ------------------------------------------------------------------ batching and log-probs vs plain forwards
def _draw(a, b):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (168, 28), "white")
    ImageDraw.Draw(im).text((50, 8), f"{a} + {b}", fill="black")
    return im


def test_collate_logprobs_match_unpadded_forward(tiny_vl_dir):
    """Sequences packed in rows (an image row next to a text row, position ids restarting per sequence,
    M-RoPE), or one per row: each completion's log-probs equal a forward of that sequence alone."""
    import generation
    from transformers import AutoModelForImageTextToText
    processor, tok = generation.load_processor(tiny_vl_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_dir, dtype=torch.float32).eval()
    rows = [{"question": "Solve the problem.", "answer": "5", "options": None, "images": [_draw(2, 3)]},
            {"question": "What is 12 + 30?", "answer": "42", "options": None, "images": []},
            {"question": "Pick one.", "answer": "A", "options": ["5", "6"], "images": []}]
    completions = [[5, 9, 30, 31, 2], [7, 8], [40, 41, 42]]
    rope_index = common.make_rope_index(model, model.config.image_token_id)
    samples = []
    for row, comp in zip(rows, completions):
        prompt = rl.build_prompt(processor, row)
        ids, vision = rl.encode_prompt(processor, tok, prompt, row["images"])
        rope = rope_index(torch.tensor([ids + comp]), vision["image_grid_thw"]) if vision else None
        samples.append({"prompt_ids": ids, "vision": vision, "rope": rope, "completion_ids": comp,
                        "loss_mask": [1] * len(comp), "sampler_logprobs": [0.0] * len(comp), "advantage": 1.0})
    assert "<|image_pad|>" in tok.decode(samples[0]["prompt_ids"]) and "Options" in rl.build_prompt(processor, rows[2])
    T = 0.7
    wrapped = common.LogProbModel(model, chunk_size=4)
    with torch.no_grad():
        for layout in ([[0, 1], [2]], [[0], [1], [2]], [[2, 0, 1]]):
            batch = rl.collate(samples, layout, tok.pad_token_id, "cpu")
            logp, ent = rl.completion_logprobs(wrapped, batch, T, with_entropy=True)
            assert logp.shape == batch["input_ids"].shape and batch["mask"].sum().item() == 10
            for i, r, cols in batch["spans"]:
                s = samples[i]
                ids = torch.tensor([s["prompt_ids"] + s["completion_ids"]])
                # mm_token_type_ids, as the processor returns them: without, transformers drops M-RoPE
                types = (ids == model.config.image_token_id).int()
                logits = model(input_ids=ids, mm_token_type_ids=types, **s["vision"]).logits
                logits = logits[0, len(s["prompt_ids"]) - 1:-1]
                ref = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(s["completion_ids"])[:, None])[:, 0]
                assert torch.allclose(logp[r, cols], ref, atol=1e-4), (layout, i, logp[r, cols], ref)
            assert (ent[batch["mask"] > 0] > 0).all() and (logp[batch["mask"] == 0] == 0).all()


def test_shared_prompt_layout_equals_separate_sequences(tiny_vl_dir):
    """share_prompts: a group's prompt (here with an image) laid out once per row, the other completions
    attending to that copy through sdpa_packed. Log-probs and gradients equal the unshared layout (each
    sequence in full) within 1e-5, also when a row holds two groups and padding."""
    import generation
    processor, tok = generation.load_processor(tiny_vl_dir)
    model = common.load_model(tiny_vl_dir, torch.device("cpu"), 1)
    assert model.config.text_config._attn_implementation == common.PACKED_SDPA
    rope_index = common.make_rope_index(model, model.config.image_token_id)
    rows = [{"question": "Solve the problem.", "answer": "5", "options": None, "images": [_draw(2, 3)]},
            {"question": "What is 12 + 30?", "answer": "42", "options": None, "images": []}]
    # the last completion is longer than its prompt: the prefix joins its causal call instead of a mask
    completions = [[[5, 9, 30, 31, 2], [7, 8], [40, 41, 42, 43]], [[50, 51], [52, 53, 54, 55, 56], list(range(60, 300))]]
    samples = []
    for g, (row, comps) in enumerate(zip(rows, completions)):
        ids, vision = rl.encode_prompt(processor, tok, rl.build_prompt(processor, row), row["images"])
        for comp in comps:
            rope = rope_index(torch.tensor([ids + comp]), vision["image_grid_thw"]) if vision else None
            samples.append({"prompt_ids": ids, "vision": vision, "rope": rope, "completion_ids": comp, "group": g,
                            "loss_mask": [1] * len(comp), "sampler_logprobs": [0.0] * len(comp),
                            "advantage": 1.0})
    wrapped = common.LogProbModel(model, chunk_size=4)
    weight = model.model.language_model.layers[0].self_attn.q_proj.weight

    def per_sample(layout, share):
        batch = rl.collate(samples, layout, tok.pad_token_id, "cpu", share_prompts=share)
        logp, ent = rl.completion_logprobs(wrapped, batch, 0.7, with_entropy=True)
        grad = torch.autograd.grad(logp.sum(), weight)[0]
        return ({i: (logp[r, cols].detach(), ent[r, cols]) for i, r, cols in batch["spans"]}, grad,
                batch["input_ids"].numel())

    ref, ref_grad, ref_slots = per_sample([[i] for i in range(6)], False)
    assert len(samples[5]["completion_ids"]) > len(samples[5]["prompt_ids"])
    # [[3, 4, 5]]: text-only rows of a VLM (2-D position ids), packed with and without the shared prompt
    for layout, share in (([[0, 1, 2], [3, 4, 5]], True), ([[3, 4, 5, 0, 1, 2]], True), ([[0, 1], [2, 3, 4, 5]], True),
                          ([[3, 4, 5]], True), ([[3, 4], [0]], False)):
        got, grad, slots = per_sample(layout, share)
        for i in got:
            torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=0)  # log-probs and entropies
        if len(got) == 6:
            torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
            assert slots < ref_slots
    cfg = rl.Config(micro_batch_tokens=10 ** 6)
    assert rl.shared_prompts(samples, cfg) and not rl.shared_prompts(samples, rl.Config(packing=False))
    assert rl.microbatches(samples, cfg) == [[[3, 4, 5, 0, 1, 2]]]  # one row: each prompt once


def test_microbatches_pack_by_token_budget():
    """Packing: rows never longer than the longest sequence; each micro-batch's padded size within the
    budget (a lone row may exceed it); every sample exactly once; far less padding than one per row."""
    import random as rnd
    r = rnd.Random(0)
    samples = [{"prompt_ids": [1] * r.randint(5, 20), "completion_ids": [2] * int(r.paretovariate(1.2) * 20)}
               for _ in range(64)]
    lengths = [len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples]
    cfg = rl.Config(packing=True, micro_batch_tokens=600)
    mbs = rl.microbatches(samples, cfg)
    assert sorted(i for mb in mbs for row in mb for i in row) == list(range(64))
    slots = 0
    for mb in mbs:
        widths = [sum(lengths[i] for i in row) for row in mb]
        assert max(widths) <= max(lengths)
        assert len(mb) == 1 or len(mb) * max(widths) <= 600
        slots += len(mb) * max(widths)
    padded = sum(max(lengths[i] for i in range(k, min(k + 2, 64))) * 2 for k in range(0, 64, 2))
    assert 1 - sum(lengths) / slots < 0.1 < 1 - sum(lengths) / padded


# ---------------------------------------------------------------------------------------------- end to end
KEYS = ["reward_mean", "reward_std", "accuracy", "zero_var_group_frac", "response_length_mean", "response_length_max",
        "truncation_rate", "clip_fraction", "kl", "entropy", "grad_norm", "gen_tokens_per_s", "train_tokens_per_s",
        "time_generate", "time_score", "time_train", "logprob_gap_mean", "train_tokens"]


def _mixed_data(tmp_path, n=8):
    """Question/answer rows: half with a drawn image, some multiple choice."""
    os.makedirs(tmp_path / "images", exist_ok=True)
    rng = random.Random(0)
    with open(tmp_path / "mm.jsonl", "w") as f:
        for i in range(n):
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            if i % 2 == 0:
                _draw(a, b).save(tmp_path / "images" / f"{i}.png")
                row = {"question": "Solve the problem.", "answer": str(a + b), "images": [f"images/{i}.png"]}
            else:
                row = {"question": f"What is {a} + {b}?", "options": [str(a + b), str(a + b + 1)], "answer": "A"}
            f.write(json.dumps(row) + "\n")
    return str(tmp_path / "mm.jsonl")


def _read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


COMMON = ["--backend", "hf", "--prompts_per_step", "4", "--num_generations", "3", "--max_response_length", "12",
          "--micro_batch_size", "5", "--learning_rate", "1e-3", "--save_steps", "1"]
ENV = {"OMP_NUM_THREADS": "1"}


def test_two_steps_then_resume(tiny_vl_dir, tmp_path):
    data, out = _mixed_data(tmp_path), str(tmp_path / "run")
    run_script("rl.py", "--model_name_or_path", tiny_vl_dir, "--dataset", data, "--output_dir", out,
               "--max_steps", "2", *COMMON, env=ENV)
    log = _read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert all(k in r and math.isfinite(r[k]) for k in KEYS), r
        # every sampled token trains (but a random model's rare sampled image placeholder)
        assert 0.9 * r["response_length_mean"] * 12 <= r["train_tokens"] <= round(r["response_length_mean"] * 12)
        assert r["logprob_gap_mean"] < 1e-2  # hf backend: the sampler is the policy itself
    assert log[1]["kl"] > 0 or log[0]["grad_norm"] == 0  # beta = 1e-2: a reference model; KL once it moved
    assert os.path.exists(os.path.join(out, "checkpoint-2", "trainer_state.json"))
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert len(open(os.path.join(out, "completions.jsonl")).readlines()) == 2

    # resume to step 3 (with dynamic sampling: groups of equal rewards are replaced, bounded by 1 round)
    proc = run_script("rl.py", "--model_name_or_path", tiny_vl_dir, "--dataset", data, "--output_dir", out,
                      "--max_steps", "3", *COMMON, "--resume", "True", "--dynamic_sampling", "True",
                      "--dynamic_sampling_max_rounds", "1", env=ENV)
    assert "resuming at step 2" in proc.stdout
    log = _read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[2]["refill_groups"] == round(4 * log[2]["zero_var_group_frac"])  # one refill round
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]


def test_two_steps_torchrun_two_processes(tiny_vl_dir, tmp_path):
    data, out = _mixed_data(tmp_path), str(tmp_path / "run")
    proc = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "rl.py",
               "--model_name_or_path", tiny_vl_dir, "--dataset", data, "--output_dir", out, "--max_steps", "2",
               *COMMON, "--mask_truncated_completions", "True", env=ENV)
    assert "on 2 process(es)" in proc.stdout
    log = _read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    for r in log:  # gathered over both ranks: 4 prompts x 3 completions; truncated ones masked
        kept = (1 - r["truncation_rate"]) * 12
        assert r["train_tokens"] <= round(r["response_length_mean"] * 12) and r["train_tokens"] >= kept
        assert all(math.isfinite(r[k]) for k in KEYS)
    assert os.path.exists(os.path.join(out, "checkpoint-2", "trainer_state.json"))


def test_overlong_prompts_are_filtered_and_counted(tiny_vl_dir, tmp_path):
    data, out = _mixed_data(tmp_path), str(tmp_path / "run")
    cmd = [sys.executable, "rl.py", "--model_name_or_path", tiny_vl_dir, "--dataset", data, "--output_dir", out,
           "--max_steps", "1", *COMMON, "--max_prompt_length", "30"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ENV})
    assert proc.returncode != 0 and "0 usable prompts (8 longer than --max_prompt_length 30)" in proc.stderr


# ---------------------------------------------------------------------------------------------- learning
# Questions whose answer is always 4: a 2M-parameter model cannot learn to read and add from a long prompt
# in a few minutes of CPU, but it can learn which answer earns the reward; that is what GRPO must show.
FOURS = [(0, 4), (1, 3), (2, 2), (3, 1), (4, 0)]


def adder_data(path, pairs=FOURS):
    """Orz-math-shaped toy data: "What is a + b?" with its sum as the ground truth."""
    rows = [[{"from": "human", "value": f"What is {a} + {b}?"}, {"from": "assistant", "ground_truth": {"value": str(a + b)}}]
            for a, b in pairs]
    with open(path, "w") as f:
        json.dump(rows, f)
    return str(path)


def sft_toy_adder(src, out, steps=80, lr=3e-3, noise=1.0, pairs=FOURS, seed=0):
    """A brief plain-torch SFT of the tiny text model in the paper's answer format: `<think> a + b </think>
    <answer>s</answer>`, where s is a uniformly random digit in a `noise` fraction of the targets (else the
    sum). The model learns the format; how often it answers right is then up to RL."""
    import generation
    import rewards
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor, tok = generation.load_processor(src)
    auto = AutoModelForImageTextToText if hasattr(processor, "image_processor") else AutoModelForCausalLM
    model = auto.from_pretrained(src, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        ids, labels = [], []
        for _ in range(16):
            a, b = rng.choice(pairs)
            p = tok(rl.build_prompt(processor, {"question": f"What is {a} + {b}?", "options": None, "images": []}),
                    add_special_tokens=False)["input_ids"]
            ans = rng.randrange(9) if rng.random() < noise else a + b
            c = tok(rewards.format_response(f"{a} + {b}", str(ans)) + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        L = max(map(len, ids))
        x = torch.tensor([i + [tok.pad_token_id] * (L - len(i)) for i in ids])
        y = torch.tensor([lab + [-100] * (L - len(lab)) for lab in labels])
        attn = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids])
        model(input_ids=x, attention_mask=attn, labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def mixed_adder_data(tmp_path):
    """The adder questions as text rows, and two rows whose question is an image (answer 4 too)."""
    os.makedirs(tmp_path / "images", exist_ok=True)
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in FOURS]
    for i, (a, b) in enumerate(FOURS[:3]):
        _draw(a, b).save(tmp_path / "images" / f"q{i}.png")
        rows.append({"question": "Solve the problem.", "answer": str(a + b), "images": [f"images/q{i}.png"]})
    with open(tmp_path / "mixed.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(tmp_path / "mixed.jsonl")


def sampled_accuracy(model_dir, pairs=FOURS, n=64):
    """Mean reward of n samples (temperature 1) per question: 5 x 64 = 320 samples."""
    import generation
    import rewards
    engine = generation.load_engine(model_dir, "hf")
    prompts = [{"prompt": rl.build_prompt(engine.processor, {"question": f"What is {a} + {b}?", "options": None,
                                                              "images": []})} for a, b in pairs]
    outs = generation.generate(engine, prompts, n=n, temperature=1.0, max_new_tokens=24, seed=123, batch_size=160)
    r = rewards.accuracy_reward([c.text for o in outs for c in o], [str(a + b) for a, b in pairs for _ in range(n)])
    return sum(r) / len(r)


@pytest.mark.slow
def test_grpo_raises_the_reward(tiny_text_dir, tmp_path):
    """From a tiny model briefly fine-tuned on the answer format with random answers (reward ~1/9), 30 GRPO
    steps raise the reward clearly: in the training log and on 320 fresh samples of the saved policy."""
    sft = sft_toy_adder(tiny_text_dir, tmp_path / "sft")
    data, out = adder_data(tmp_path / "add.json"), str(tmp_path / "rl")
    run_script("rl.py", "--backend", "hf", "--model_name_or_path", sft, "--dataset", data, "--output_dir", out,
               "--max_steps", "30", "--prompts_per_step", "5", "--num_generations", "8", "--max_response_length", "24",
               "--learning_rate", "3e-4", "--beta", "0", "--warmup_ratio", "0", "--micro_batch_size", "32",
               "--save_steps", "0", env=ENV)
    reward = [r["reward_mean"] for r in _read_log(out)]
    before, after = sampled_accuracy(sft), sampled_accuracy(out)
    print(f"sampled accuracy {before:.3f} -> {after:.3f}; rewards {reward}")
    assert sum(reward[-10:]) / 10 > sum(reward[:3]) / 3 + 0.1, reward
    assert after > before + 0.15, (before, after, reward)
