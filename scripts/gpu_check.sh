#!/usr/bin/env bash
# Everything a session with a GPU should run, in one go (the device tool gives ~30 minutes):
# build the extension, run the whole test suite (GPU tests included), compute-sanitizer memcheck and
# racecheck over the CUDA kernels' tests, and the benchmarks. Logs and results JSON go to $OUT
# (default bench/results); commit the JSON under bench/results/.
#
# A failing step is recorded and the script goes on (one device window should yield every result
# it can); the exit status is 1 if any step failed. The list of failed steps ends the output.
#
# Assumes torch, triton, pybind11, cmake and ninja are installed (the GPU image has them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
failed=()

# step NAME LOG COMMAND...: run COMMAND, its output shown and kept in $OUT/LOG.
step() {
  local name=$1 log=$2
  shift 2
  echo "== $name"
  if ! "$@" 2>&1 | tee "$OUT/$log"; then
    failed+=("$name")
  fi
}

CROSSSPEC_CUDA_ARCHS="${CROSSSPEC_CUDA_ARCHS:-80;90a}" \
  python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
step "crossspec info" info.log crossspec info

step "tests (GPU tests run here)" tests.log python -m pytest -q -rs tests

cuda_tests=(tests/test_verify.py -q -k "gpu_backend_matches_reference and cuda and (float32 or bfloat16)")
events_tests=(tests/test_events_to_frames.py -q -k "gpu and cuda and not 1000000")
step "memcheck: verify" memcheck.log \
  compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest "${cuda_tests[@]}"
step "racecheck: verify" racecheck.log \
  compute-sanitizer --tool racecheck --error-exitcode 1 python -m pytest "${cuda_tests[@]}"
step "memcheck: events_to_frames" memcheck_events.log \
  compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest "${events_tests[@]}"

step "bench: verify" bench_verify.log python bench/bench_verify.py --out "$OUT"
step "bench: tree_attention" bench_tree_attention.log python bench/bench_tree_attention.py --out "$OUT"
step "bench: lm_head_topk" bench_lm_head_topk.log python bench/bench_lm_head_topk.py --out "$OUT"
step "bench: events" bench_events.log python bench/bench_events.py --out "$OUT"
step "bench: e2e" bench_e2e.log python bench/bench_e2e.py --preset 7b --quick --out "$OUT"
step "bench: overlap" bench_overlap.log python bench/bench_overlap.py --preset 7b --quick --out "$OUT"

if ((${#failed[@]})); then
  printf '== FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "== all steps passed"
