#!/usr/bin/env bash
# Wheel smoke test: does a wheel of this package, installed into a fresh venv, run?
#
# 1. Copies the source tree (without .venv, build outputs, caches and compiled *.so files, so no
#    stale extension or build/lib leftover can slip into the wheel) to a temporary folder and builds
#    a pure-Python wheel there with CROSSSPEC_SKIP_CUDA=1 (setup.py's knob), using the dev venv's pip
#    without build isolation (the build tools are already in .venv).
# 2. Creates a fresh venv (no --system-site-packages), installs torch==2.13.0 FIRST (the CPU build;
#    a bare `torch` requirement would pull a multi-GB CUDA build), then the wheel, letting pip
#    resolve the other dependencies from pyproject.toml, and runs `pip check`.
# 3. From a folder outside the source tree (so the checkout is not what gets imported) runs
#    `crossspec --help`, `crossspec demo --help`, `import crossspec_kernels; from crossspec_kernels
#    import verify`, `crossspec info` and a short `crossspec demo`.
# Everything lives in one temporary folder, removed on exit.
#
# Environment: BUILD_PYTHON (the interpreter whose pip builds the wheel, default .venv/bin/python),
# PYTHON (the interpreter for the fresh venv, default: the one .venv was made from), TORCH_SPEC
# (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

BUILD_PYTHON="${BUILD_PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$BUILD_PYTHON" ]; then
  echo "wheel_smoke: error: $BUILD_PYTHON not found; run scripts/setup_env.sh or set BUILD_PYTHON" >&2
  exit 2
fi
PYTHON="${PYTHON:-$("$BUILD_PYTHON" -c 'import sys; print(sys._base_executable)')}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/crossspec-wheel-smoke.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

start=$(date +%s)
step() { echo; echo "wheel_smoke: [$(($(date +%s) - start)) s] $*"; }
fail() { echo "wheel_smoke: FAILED: $*" >&2; exit 1; }

step "copying the source tree to $tmp/src"
mkdir "$tmp/src"
tar -C "$root" -c \
  --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude='*.so' --exclude=.pytest_cache --exclude=.ruff_cache \
  --exclude=.benchmarks . | tar -C "$tmp/src" -x

step "building the wheel (CROSSSPEC_SKIP_CUDA=1, pure Python)"
CROSSSPEC_SKIP_CUDA=1 "$BUILD_PYTHON" -m pip wheel --no-deps --no-build-isolation --progress-bar off \
  -w "$tmp/dist" "$tmp/src" || fail "pip wheel could not build the package"
shopt -s nullglob
wheels=("$tmp"/dist/crossspec_kernels-*.whl)
shopt -u nullglob
[ "${#wheels[@]}" -eq 1 ] || fail "expected one wheel in $tmp/dist, found ${#wheels[@]}"
wheel="${wheels[0]}"
echo "wheel_smoke: built $(basename "$wheel")"
# A wheel built without the extension must not carry one (nor be tagged for one interpreter).
"$BUILD_PYTHON" - "$wheel" <<'EOF' || fail "the wheel's contents are wrong (see above)"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
compiled = [n for n in names if n.endswith((".so", ".pyd"))]
if compiled:
    sys.exit(f"wheel_smoke: the pure-Python wheel contains compiled files: {compiled}")
for needed in ("crossspec_kernels/cli.py", "crossspec_kernels/ops/verify.py"):
    if needed not in names:
        sys.exit(f"wheel_smoke: the wheel lacks {needed}")
print(f"wheel_smoke: {len(names)} files, no compiled extension")
EOF

step "creating a fresh venv with $("$PYTHON" --version 2>&1) ($PYTHON)"
"$PYTHON" -m venv "$tmp/venv"
venv_py="$tmp/venv/bin/python"
pip_install() { "$venv_py" -m pip install --progress-bar off "$@"; }

step "installing $TORCH_SPEC first"
pip_install "$TORCH_SPEC" || fail "pip could not install $TORCH_SPEC"

step "installing the wheel (pip resolves its other dependencies)"
pip_install "$wheel" || fail "pip could not install the wheel or one of its dependencies (see above)"
"$venv_py" -m pip check || fail "pip check: the fresh venv's dependencies are inconsistent"
"$venv_py" -m pip list --format=freeze 2>/dev/null |
  grep -iE '^(torch|triton|numpy|transformers|safetensors|tokenizers|huggingface.hub|crossspec.kernels)==' |
  sed 's/^/wheel_smoke:   /' || true

# Run from an empty folder: with the checkout as the working directory, `python -c` would import
# the source tree instead of the installed wheel.
mkdir "$tmp/run"
cd "$tmp/run"
export PATH="$tmp/venv/bin:$PATH"
unset PYTHONPATH

step "crossspec --help"
crossspec --help >"$tmp/help.txt" || fail "crossspec --help exited with status $?"
grep -q "^usage: crossspec" "$tmp/help.txt" || fail "crossspec --help printed no usage line"

step "crossspec demo --help"
crossspec demo --help >"$tmp/demo-help.txt" || fail "crossspec demo --help exited with status $?"
grep -q "^usage: crossspec demo" "$tmp/demo-help.txt" || fail "crossspec demo --help printed no usage line"

step "import crossspec_kernels; from crossspec_kernels import verify"
"$venv_py" - "$tmp/venv" <<'EOF' || fail "importing the installed package failed"
import os, sys
import crossspec_kernels
from crossspec_kernels import verify
location = os.path.realpath(crossspec_kernels.__file__)
if not location.startswith(os.path.realpath(sys.argv[1]) + os.sep):
    sys.exit(f"wheel_smoke: imported crossspec_kernels from {location}, not from the fresh venv")
if not callable(verify):
    sys.exit(f"wheel_smoke: crossspec_kernels.verify is {verify!r}, not a function")
print(f"wheel_smoke: crossspec_kernels {crossspec_kernels.__version__} from {location}")
EOF

step "crossspec info"
crossspec info >"$tmp/info.txt" || fail "crossspec info exited with status $?"
grep -q "^crossspec_kernels" "$tmp/info.txt" || fail "crossspec info printed no package line"
sed 's/^/wheel_smoke:   /' "$tmp/info.txt"

step "crossspec demo --train-clips 8 --epochs 2 --backend reference (a short demo)"
crossspec demo --train-clips 8 --epochs 2 --backend reference --json "$tmp/demo.json" >"$tmp/demo.txt" ||
  { cat "$tmp/demo.txt"; fail "crossspec demo exited with status $? (1: outputs differ)"; }
tail -n 5 "$tmp/demo.txt" | sed 's/^/wheel_smoke:   /'

step "OK: the wheel installs into a fresh venv and runs"
