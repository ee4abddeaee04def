#!/usr/bin/env bash
# Everything a session with a GPU should run, in one go (the device tool gives ~30 minutes):
# build the extension, run the whole test suite (GPU tests included), compute-sanitizer memcheck and
# racecheck over the CUDA kernel's tests, and the benchmark. Logs and results JSON go to $OUT
# (default bench/results); commit the JSON under bench/results/.
#
# Assumes torch, triton, pybind11, cmake and ninja are installed (the GPU image has them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"

CROSSSPEC_CUDA_ARCHS="${CROSSSPEC_CUDA_ARCHS:-80;90a}" \
  python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
crossspec info | tee "$OUT/info.log"

echo "== tests (GPU tests run here)"
python -m pytest -q -rs tests 2>&1 | tee "$OUT/tests.log"

echo "== compute-sanitizer over the CUDA kernel's tests"
cuda_tests=(tests/test_verify.py -q -k "gpu_backend_matches_reference and cuda and (float32 or bfloat16)")
compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest "${cuda_tests[@]}" 2>&1 |
  tail -n 20 | tee "$OUT/memcheck.log"
compute-sanitizer --tool racecheck --error-exitcode 1 python -m pytest "${cuda_tests[@]}" 2>&1 |
  tail -n 20 | tee "$OUT/racecheck.log"
events_tests=(tests/test_events_to_frames.py -q -k "gpu and cuda and not 1000000")
compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest "${events_tests[@]}" 2>&1 |
  tail -n 20 | tee "$OUT/memcheck_events.log"

echo "== benchmarks"
python bench/bench_verify.py --out "$OUT" 2>&1 | tee "$OUT/bench_verify.log"
python bench/bench_tree_attention.py --out "$OUT" 2>&1 | tee "$OUT/bench_tree_attention.log"
python bench/bench_lm_head_topk.py --out "$OUT" 2>&1 | tee "$OUT/bench_lm_head_topk.log"
python bench/bench_events.py --out "$OUT" 2>&1 | tee "$OUT/bench_events.log"
python bench/bench_e2e.py --preset 7b --quick --out "$OUT" 2>&1 | tee "$OUT/bench_e2e.log"
python bench/bench_overlap.py --preset 7b --quick --out "$OUT" 2>&1 | tee "$OUT/bench_overlap.log"
