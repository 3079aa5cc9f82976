"""scripts/memory_plan.py: the 7B's parameter counts, the paper's settings fit where the README says they do, an
impossible setting does not, vLLM's tensor-parallel rule, and --json. Seconds: the model is built on meta."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import memory_plan  # noqa: E402


def plan(*flags):
    a = memory_plan.parse_args([str(f) for f in flags])
    r = memory_plan.plan(a)
    return r, memory_plan.advice(a, r)


def test_7b_parameter_counts_are_the_real_ones():
    m = memory_plan.count_parameters(memory_plan.load_config("qwen2.5-vl-7b"))
    p = m["parts"]
    assert m["total"] == 8_292_166_656
    assert p["vision_tower"] == 631_975_680  # 32 blocks + the patch embedding
    assert p["projector"] == 44_574_464  # the merger
    assert p["embeddings"] == p["lm_head"] == 544_997_376 and not m["tied_embeddings"]
    assert m["num_layers"] == 28 and m["layer"] == 233_057_792 and p["decoder_layers"] == 28 * 233_057_792
    assert m["trainable"] == 7_660_190_976  # vision tower frozen, merger trained
    assert m["kv_bytes_per_token"] == 56 * 1024  # 28 layers x 4 KV heads x 128 x (K, V) x bf16


def test_3b_preset_ties_its_head():
    m = memory_plan.count_parameters(memory_plan.load_config("qwen2.5-vl-3b"))
    assert m["total"] == 3_754_622_976 and m["tied_embeddings"] and m["num_layers"] == 36


@pytest.mark.parametrize("gpus,gib", [(32, 40), (8, 80)])
def test_paper_sft_fits(gpus, gib):
    # paper: 4 examples per GPU, 4096 tokens, vision tower frozen, gradient checkpointing
    r, _ = plan("--stage", "sft", "--num_gpus", gpus, "--gpu_memory_gib", gib, "--per_device_batch_size", 4,
                "--max_length", 4096)
    assert r["fits"], r["phases"]
    assert r["fsdp"] and r["tokens_per_micro_batch"] == 4 * 4096


@pytest.mark.parametrize("gpus,gib", [(32, 40), (8, 80)])
def test_paper_rl_fits_with_a_larger_vllm_share(gpus, gib):
    # paper: 128 prompts x 8, responses of 4096 tokens, beta 1e-2; vLLM colocated, asleep while training
    flags = ["--stage", "rl", "--num_gpus", gpus, "--gpu_memory_gib", gib, "--prompts_per_step", 128,
             "--num_generations", 8, "--max_response_length", 4096, "--beta", 0.01]
    r, _ = plan(*flags, "--vllm_gpu_memory_utilization", 0.7)
    assert r["fits"], r["phases"]
    assert r["kv_sequences_at_once"] >= r["sequences_per_engine"]  # the whole step's rollouts at once
    # with rl.py's old 0.3, the 40 GB card's share (11.8 GiB) cannot hold the bf16 weights: the plan says so
    # and names the flag
    if gib == 40:
        r, tips = plan(*flags, "--vllm_gpu_memory_utilization", 0.3)
        assert not r["fits"] and not r["phases"]["generate"]["fits"] and r["phases"]["training"]["fits"]
        assert any(t.startswith("--vllm_gpu_memory_utilization") for t in tips)


def test_impossible_setting_does_not_fit_and_says_what_to_change():
    r, tips = plan("--stage", "sft", "--num_gpus", 1, "--gpu_memory_gib", 40)  # 116.5 GiB of fp32 state alone
    assert not r["fits"] and r["phases"]["training"]["total_gib"] > 116
    assert any("GPUs instead of 1" in t for t in tips)
    r, tips = plan("--stage", "sft", "--num_gpus", 8, "--gpu_memory_gib", 80, "--no_gradient_checkpointing",
                   "--max_length", 8192)
    assert not r["fits"] and "--gradient_checkpointing true" in tips


def test_checkpointing_and_sharding_shrink_the_plan():
    base = ["--stage", "rl", "--num_gpus", 8, "--gpu_memory_gib", 80]
    on, _ = plan(*base)
    off, _ = plan(*base, "--gradient_checkpointing", "false")
    assert off["phases"]["training"]["total_gib"] > on["phases"]["training"]["total_gib"] + 20
    more, _ = plan(*base[:2], "--num_gpus", 32, "--gpu_memory_gib", 80)
    assert more["phases"]["training"]["total_gib"] < on["phases"]["training"]["total_gib"]


def test_tensor_parallel_must_divide_the_heads():
    m = memory_plan.count_parameters(memory_plan.load_config("qwen2.5-vl-7b"))
    assert memory_plan.allowed_tensor_parallel(m, 8) == [1, 2, 4]  # 28 heads, 4 KV heads, 16 vision heads
    a = memory_plan.parse_args(["--stage", "rl", "--vllm_tensor_parallel_size", "8"])
    err = memory_plan.check_tensor_parallel(a)
    assert err and "28 attention heads" in err and "1, 2, 4" in err


def test_json_output_parses_and_tp8_is_refused(capsys):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "memory_plan.py"), "--stage", "rl",
                          "--num_gpus", "8", "--gpu_memory_gib", "80", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert set(r["phases"]) == {"training", "generate", "push"} and isinstance(r["fits"], bool)
    assert r["parameters"]["total"] == 8_292_166_656 and "advice" in r
    assert memory_plan.main(["--stage", "rl", "--vllm_tensor_parallel_size", "8", "--json"]) == 2
    assert "28 attention heads" in json.loads(capsys.readouterr().out)["error"]
