#!/usr/bin/env bash
# What a session with a GPU runs, in stages sized for a short device window (15 minutes in all,
# at most 10 per command): one command per stage, each writing its JSON into $OUT before the next
# stage starts, so a window that closes early still yields the stages that finished.
#
#   bash scripts/gpu_check.sh 1   # build, GPU tests of the kernels and the engine, compute-sanitizer
#   bash scripts/gpu_check.sh 2   # kernel microbenchmarks and the round's host overhead
#   bash scripts/gpu_check.sh 3   # end to end at 7B shape: prefill hiding, engine vs generate
#   bash scripts/gpu_check.sh all
#
# Stage durations when last run: never run yet (no session has had a device since the stages were
# cut; each is sized to stay under ~5 minutes on an H100). Update this line with stageN.json's seconds.
#
# Every stage writes $OUT/stageN.json: each step's name, exit status, seconds and log file. A failing
# step is recorded and the stage goes on; the exit status is 1 if any step failed. Commit the JSON
# under bench/results/. Assumes torch, triton, pybind11, cmake and ninja (the GPU image has them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
stages="${1:-all}"
[[ "$stages" == all ]] && stages="1 2 3"
failed=()
records=()

# step NAME LOG COMMAND...: run COMMAND, its output shown and kept in $OUT/LOG, its status recorded.
step() {
  local name=$1 log=$2 start status
  shift 2
  echo "== $name"
  start=$(date +%s)
  "$@" 2>&1 | tee "$OUT/$log"
  status=${PIPESTATUS[0]}
  ((status == 0)) || failed+=("$name")
  records+=("{\"step\": \"$name\", \"status\": $status, \"seconds\": $(($(date +%s) - start)), \"log\": \"$log\"}")
}

# finish N: write $OUT/stageN.json from the steps recorded since the last finish.
finish() {
  local joined
  joined=$(IFS=,; echo "${records[*]}")
  printf '{"stage": %s, "date": "%s", "steps": [%s]}\n' "$1" "$(date -u +%FT%TZ)" "$joined" >"$OUT/stage$1.json"
  echo "== wrote $OUT/stage$1.json"
  records=()
}

stage1() {
  step "build" build.log env CROSSSPEC_CUDA_ARCHS="${CROSSSPEC_CUDA_ARCHS:-90a}" \
    python -m pip install --no-build-isolation --no-deps -e .
  step "crossspec info" info.log crossspec info
  # GPU-marked tests (kernels against the reference, the engine's cuda_graph mode) and the
  # engine, round and HF-integration suites on the GPU's default backends.
  step "GPU tests" tests_gpu.log python -m pytest -q -rs -m gpu tests
  step "engine tests" tests_engine.log python -m pytest -q -x tests/test_round.py tests/test_engine.py tests/test_device_pair.py \
    tests/test_hf_attention.py
  local cuda_tests=(tests/test_verify.py -q -k "gpu_backend_matches_reference and cuda and (float32 or bfloat16)")
  step "memcheck: verify" memcheck.log \
    compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest "${cuda_tests[@]}"
  step "racecheck: verify" racecheck.log \
    compute-sanitizer --tool racecheck --error-exitcode 1 python -m pytest "${cuda_tests[@]}"
  step "memcheck: events_to_frames" memcheck_events.log \
    compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest tests/test_events_to_frames.py -q \
    -k "gpu and cuda and not 1000000"
  finish 1
}

stage2() {
  step "bench: overhead (host-bound round, eager / compile / cuda_graph)" bench_overhead.log \
    python bench/bench_overhead.py --device cuda --out "$OUT"
  step "bench: verify" bench_verify.log python bench/bench_verify.py --quick --out "$OUT"
  step "bench: tree_attention" bench_tree_attention.log python bench/bench_tree_attention.py --quick --out "$OUT"
  step "bench: lm_head_topk" bench_lm_head_topk.log python bench/bench_lm_head_topk.py --quick --out "$OUT"
  step "bench: events" bench_events.log python bench/bench_events.py --quick --out "$OUT"
  finish 2
}

stage3() {
  step "bench: e2e" bench_e2e.log python bench/bench_e2e.py --preset 7b --quick --out "$OUT"
  step "bench: overlap" bench_overlap.log python bench/bench_overlap.py --preset 7b --quick --out "$OUT"
  finish 3
}

for stage in $stages; do
  case "$stage" in
    1 | 2 | 3) "stage$stage" ;;
    *) echo "gpu_check.sh: unknown stage '$stage' (use 1, 2, 3 or all)" >&2; exit 2 ;;
  esac
done

if ((${#failed[@]})); then
  printf '== FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "== all steps passed"
