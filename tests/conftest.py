"""Shared fixtures: tiny models and toy data, made once per test session (nothing is downloaded)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # so tests import the stage scripts (`import rewards`, `import sft`, ...)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_script(*args, env=None, timeout=900):
    """Run a project script with this interpreter; fail the test with its output if it fails."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}"
                    f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    """A random tiny Qwen2.5-VL (AutoProcessor + AutoModelForImageTextToText)."""
    out = str(tmp_path_factory.mktemp("tiny-vl"))
    run_script("scripts/make_tiny_model.py", "--output_dir", out, "--kind", "vl")
    return out


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A random tiny Qwen2 text model with head_dim 64 (AutoTokenizer + AutoModelForCausalLM; vLLM CPU)."""
    out = str(tmp_path_factory.mktemp("tiny-text"))
    run_script("scripts/make_tiny_model.py", "--output_dir", out, "--kind", "text")
    return out


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory):
    """The toy datasets in the real datasets' shapes (see scripts/make_toy_data.py)."""
    out = str(tmp_path_factory.mktemp("toy-data"))
    run_script("scripts/make_toy_data.py", "--output_dir", out)
    return out
