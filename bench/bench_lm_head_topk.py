"""Benchmark of the fused LM head + log-softmax + top-k, ``crossspec_kernels.lm_head_topk``, against
eager PyTorch and ``torch.compile`` of the same computation, measured in the same run.

Two ways to run it, from the repository root:

    python bench/bench_lm_head_topk.py [--out results.json] [--quick] [--no-compile]   # table + JSON
    pytest bench/bench_lm_head_topk.py                                                 # pytest-benchmark

Shapes: the target's LM head (Vicuna-7B / Video-LLaVA: d = 4096, V = 32064, bf16), M ∈ {1, 8, 64}
drafter rows per call, k = 8 at temperature 1, with and without the full draft distribution
(``return_probs``, what ``verify`` takes as draft_probs).

The bound: the op must read W once, V·d·sizeof(W) bytes (263 MB in bf16), plus, with return_probs,
write M·V fp32 probabilities once; hidden (M·d) is negligible. GB/s and "% HBM" are those bytes over
the measured time against the device's datasheet bandwidth, so "% HBM" is the % of that bound.

Baselines (same inputs, same run): ``eager`` = F.linear in W's dtype → fp32 / T → log_softmax →
topk (→ exp for the probabilities), as a Hugging Face LM head followed by a top-k would do it, and
``compiled`` = torch.compile of that function (off with --no-compile; a compile failure is recorded,
not fatal). Every backend is checked against the reference (fp32 spec) before it is timed.

Without a CUDA device this runs a smoke mode (tiny shapes, reference backend + eager baseline, a few
iterations) that proves the script works and claims nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _common import (
    SMOKE_BANNER,
    bandwidth_gbps,
    benchmark_synced,
    describe_device,
    finish_run,
    format_table,
    percent_of_peak,
    results_payload,
    run_configs,
    script_arg_parser,
    start_run,
    synchronize,
    time_fn,
)

from crossspec_kernels import reference
from crossspec_kernels.ops._dispatch import triton_available
from crossspec_kernels.ops.lm_head_topk import lm_head_topk

VOCAB, HIDDEN = 32064, 4096  # Vicuna-7B, the Video-LLaVA language model
SMOKE_VOCAB, SMOKE_HIDDEN = 1000, 64
TOP_K = 8
TEMPERATURE = 1.0
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Our log-probs against the fp32 spec from the same inputs; the eager/compiled baselines round the
# logits to W's dtype first (bf16: ~0.4% of a logit of ~10), hence their looser bound.
OURS_ATOL, BASELINE_ATOL = 2e-3, 0.25


@dataclasses.dataclass(frozen=True)
class Config:
    rows: int  # M
    vocab: int
    hidden_dim: int
    dtype: torch.dtype
    return_probs: bool

    @property
    def bytes_bound(self) -> int:
        """W read once (+ the fp32 probabilities written once)."""
        probs = self.rows * self.vocab * 4 if self.return_probs else 0
        return self.vocab * self.hidden_dim * self.dtype.itemsize + probs

    def __str__(self) -> str:
        probs = "-probs" if self.return_probs else ""
        return f"M{self.rows}-V{self.vocab}-d{self.hidden_dim}-{DTYPE_NAMES[self.dtype]}{probs}"


def configs(*, smoke: bool, quick: bool) -> list[Config]:
    if smoke:
        return [
            Config(rows, SMOKE_VOCAB, SMOKE_HIDDEN, torch.float32, probs)
            for rows in (1, 8)
            for probs in (False, True)
        ]
    rows = (1, 64) if quick else (1, 8, 64)
    return [Config(m, VOCAB, HIDDEN, torch.bfloat16, probs) for probs in (False, True) for m in rows]


def make_inputs(config: Config, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(config.rows, config.hidden_dim, generator=gen)
    weight = torch.randn(config.vocab, config.hidden_dim, generator=gen) * config.hidden_dim**-0.5 * 3
    return dict(hidden=hidden.to(device, config.dtype), weight=weight.to(device, config.dtype))


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def eager_lm_head_topk(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, return_probs: bool
):
    logits = F.linear(hidden, weight).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    top_logprobs, top_ids = torch.topk(logprobs, k, dim=-1)
    return top_logprobs, top_ids, (logprobs.exp() if return_probs else None)


@functools.cache
def _compiled():
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    return torch.compile(eager_lm_head_topk, dynamic=False)


def op_callable(backend: str, config: Config, inputs: dict) -> Callable[[], object]:
    args = (inputs["hidden"], inputs["weight"], TOP_K)
    if backend == "eager":
        return lambda: eager_lm_head_topk(*args, TEMPERATURE, config.return_probs)
    if backend == "compiled":
        return lambda: _compiled()(*args, TEMPERATURE, config.return_probs)
    return lambda: lm_head_topk(
        *args, temperature=TEMPERATURE, return_probs=config.return_probs, backend=backend
    )


def backends_for(device: torch.device, *, compile_baseline: bool) -> tuple[list[str], list[str]]:
    """(backends to time, notes on those left out)."""
    if device.type != "cuda":
        return ["reference", "eager"], [
            "triton, compiled: no CUDA device (the smoke test times the reference)"
        ]
    chosen, notes = [], ["reference: run once per config as the correctness oracle, not timed"]
    if triton_available():
        chosen.append("triton")
    else:
        notes.append("triton: not installed")
    chosen.append("eager")
    if compile_baseline:
        chosen.append("compiled")
    else:
        notes.append("compiled: torch.compile baseline off (--no-compile)")
    return chosen, notes


def check_output(out, expected, config: Config, atol: float) -> list[str]:
    """Problems of ``out`` against the reference ``expected`` (empty = ok)."""
    logprobs, ids, probs = out
    ref_logprobs, _, ref_probs = expected
    problems = []
    if tuple(logprobs.shape) != (config.rows, TOP_K) or tuple(ids.shape) != (config.rows, TOP_K):
        return [f"shapes {tuple(logprobs.shape)}, {tuple(ids.shape)}"]
    error = float((logprobs.float() - ref_logprobs).abs().max())
    if error > atol:
        problems.append(f"log-probs off by {error:.3g} > {atol}")
    if config.return_probs:
        if probs is None:
            problems.append("no probabilities returned")
        else:
            error = float((probs.float() - ref_probs).abs().max())
            if error > atol:
                problems.append(f"probs off by {error:.3g} > {atol}")
    return problems


@functools.cache
def _reference(config: Config, device_type: str):
    inputs = _cached_inputs(config, device_type)
    return reference.lm_head_topk(
        inputs["hidden"], inputs["weight"], TOP_K, temperature=TEMPERATURE, return_probs=config.return_probs
    )


@functools.cache
def _cached_inputs(config: Config, device_type: str) -> dict:
    return make_inputs(config, torch.device(device_type))


def run_checked(backend: str, config: Config, device: torch.device) -> list[str]:
    """One untimed call (warms up Triton compiles and torch.compile traces) checked against the spec."""
    out = op_callable(backend, config, _cached_inputs(config, device.type))()
    synchronize(device)
    atol = BASELINE_ATOL if backend in ("eager", "compiled") else OURS_ATOL
    return check_output(out, _reference(config, device.type), config, atol)


def benchmark_config(config: Config, device: torch.device, info, backends: list[str], *, quick: bool):
    inputs = _cached_inputs(config, device.type)
    rows, problems = [], []
    for backend in backends:
        row = dict(
            config=str(config),
            rows=config.rows,
            vocab=config.vocab,
            hidden=config.hidden_dim,
            dtype=DTYPE_NAMES[config.dtype],
            return_probs=config.return_probs,
            k=TOP_K,
            backend=backend,
            bytes=config.bytes_bound,
        )
        try:
            found = run_checked(backend, config, device)
            row["checks"] = "ok" if not found else "; ".join(found)
            problems += [f"{config} {backend}: {p}" for p in found]
            timing = time_fn(op_callable(backend, config, inputs), device, quick=quick)
        except (
            Exception
        ) as error:  # one broken backend (e.g. a torch.compile failure) must not lose the others
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            if backend != "compiled":
                problems.append(f"{config} {backend}: {row['error']}")
            rows.append(row)
            continue
        gbps = bandwidth_gbps(config.bytes_bound, timing.median_us)
        row.update(
            median_us=timing.median_us,
            p20_us=timing.p20_us,
            p80_us=timing.p80_us,
            gbps=gbps,
            pct_peak=percent_of_peak(gbps, info),
            timing_method=timing.method,
        )
        rows.append(row)
    for baseline in ("eager", "compiled"):
        base = next((r for r in rows if r["backend"] == baseline and "median_us" in r), None)
        for row in rows:
            if base and "median_us" in row:
                row[f"speedup_vs_{baseline}"] = base["median_us"] / row["median_us"]
    return rows, problems


TABLE_COLUMNS = (
    ("config", "config", ""),
    ("backend", "backend", ""),
    ("median_us", "median us", ".1f"),
    ("p20_us", "p20 us", ".1f"),
    ("p80_us", "p80 us", ".1f"),
    ("gbps", "GB/s", ".1f"),
    ("pct_peak", "% HBM (of bound)", ".1f"),
    ("speedup_vs_eager", "x eager", ".2f"),
    ("speedup_vs_compiled", "x compiled", ".2f"),
    ("checks", "checks", ""),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_arg_parser("lm_head_topk", __doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, smoke, info = start_run(args)
    backends, notes = backends_for(device, compile_baseline=not args.no_compile and not smoke)
    print(f"timed: {', '.join(backends)}" + "".join(f"\nnot timed: {note}" for note in notes))

    all_rows, problems = run_configs(
        configs(smoke=smoke, quick=args.quick),
        lambda config: benchmark_config(config, device, info, backends, quick=args.quick),
    )

    print()
    print(format_table(all_rows, TABLE_COLUMNS))
    if smoke:
        print(SMOKE_BANNER)
    payload = results_payload(
        "lm_head_topk",
        smoke,
        info,
        backends,
        notes,
        all_rows,
        problems,
        bytes_formula="V*d*sizeof(W) (W read once), + M*V*4 when return_probs (probabilities written once)",
        inputs=f"hidden ~ N(0, 1), W ~ N(0, 9/d), seed 0; k={TOP_K}, temperature={TEMPERATURE}",
    )
    return finish_run("lm_head_topk", args.out, smoke, info, payload, problems)


# ----------------------------------------------------------------------------------------------
# pytest-benchmark mode: `pytest bench/bench_lm_head_topk.py` (bench/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_SMOKE = _DEVICE.type != "cuda"
_PYTEST_BACKENDS = ("reference", "eager") if _SMOKE else ("triton", "eager")


@pytest.mark.parametrize("backend", _PYTEST_BACKENDS)
@pytest.mark.parametrize("config", configs(smoke=_SMOKE, quick=False), ids=str)
def test_lm_head_topk(benchmark, config: Config, backend: str) -> None:
    problems = run_checked(backend, config, _DEVICE)
    assert not problems, problems
    info = describe_device(_DEVICE)
    benchmark.group = str(config)
    benchmark.extra_info.update(device=info.name, smoke_test=_SMOKE, bytes=config.bytes_bound)
    fn = op_callable(backend, config, _cached_inputs(config, _DEVICE.type))
    if not _SMOKE:
        timing = time_fn(fn, _DEVICE)
        gbps = bandwidth_gbps(config.bytes_bound, timing.median_us)
        benchmark.extra_info.update(
            do_bench_median_us=timing.median_us,
            do_bench_p20_us=timing.p20_us,
            do_bench_p80_us=timing.p80_us,
            gbps=gbps,
            pct_peak=percent_of_peak(gbps, info),
        )
    benchmark_synced(benchmark, fn, _DEVICE, smoke=_SMOKE)


def test_bytes_formula() -> None:
    config = Config(1, 32064, 4096, torch.bfloat16, False)
    assert config.bytes_bound == 32064 * 4096 * 2  # 263 MB: the bf16 LM head read once
    assert Config(8, 32064, 4096, torch.bfloat16, True).bytes_bound == 32064 * 4096 * 2 + 8 * 32064 * 4


def test_eager_baseline_matches_the_spec() -> None:
    """The baseline is a fair one only if it computes the same thing."""
    config = configs(smoke=True, quick=False)[-1]
    inputs = make_inputs(config, torch.device("cpu"))
    out = eager_lm_head_topk(inputs["hidden"], inputs["weight"], TOP_K, TEMPERATURE, True)
    expected = reference.lm_head_topk(inputs["hidden"], inputs["weight"], TOP_K, return_probs=True)
    assert not check_output(out, expected, config, 1e-4)
    assert torch.equal(out[1], expected[1])


if __name__ == "__main__":
    sys.exit(main())
