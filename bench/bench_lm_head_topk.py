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

import dataclasses
import functools
import sys
from collections.abc import Callable

import _common as harness
import pytest
import torch
import torch.nn.functional as F

from crossspec_kernels import reference
from crossspec_kernels.ops.lm_head_topk import lm_head_topk

OP = "lm_head_topk"
VOCAB, HIDDEN = 32064, 4096  # Vicuna-7B, the Video-LLaVA language model
SMOKE_VOCAB, SMOKE_HIDDEN = 1000, 64
TOP_K = 8
TEMPERATURE = 1.0
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
        return f"M{self.rows}-V{self.vocab}-d{self.hidden_dim}-{harness.DTYPE_NAMES[self.dtype]}{probs}"


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
    harness.raise_recompile_limit(64)
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
    chosen, notes = harness.kernel_backends(("triton",))
    notes.insert(0, harness.ORACLE_NOTE)
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
def _cached_inputs(config: Config, device_type: str) -> dict:
    return make_inputs(config, torch.device(device_type))


@functools.cache
def _reference(config: Config, device_type: str):
    inputs = _cached_inputs(config, device_type)
    return reference.lm_head_topk(
        inputs["hidden"], inputs["weight"], TOP_K, temperature=TEMPERATURE, return_probs=config.return_probs
    )


def run_checked(backend: str, config: Config, device: torch.device) -> tuple[Callable[[], object], list[str]]:
    """One untimed call (warms up Triton compiles and torch.compile traces) checked against the spec."""
    fn = op_callable(backend, config, _cached_inputs(config, device.type))
    out = fn()
    harness.synchronize(device)
    atol = BASELINE_ATOL if backend in ("eager", "compiled") else OURS_ATOL
    return fn, check_output(out, _reference(config, device.type), config, atol)


def benchmark_config(config: Config, device, info, backends: list[str], *, quick: bool):
    def prepare(backend):
        fn, found = run_checked(backend, config, device)
        return fn, {}, found

    fields = dict(harness.config_fields(config, hidden_dim="hidden"), k=TOP_K)
    rows, problems = harness.measure_backends(
        config, backends, prepare, device=device, info=info, quick=quick, num_bytes=config.bytes_bound,
        fields=fields, optional=("compiled",),  # e.g. a torch.compile failure is recorded, not fatal
    )  # fmt: skip
    harness.add_speedups(rows, ("eager", "compiled"))
    return rows, problems


TABLE_COLUMNS = harness.op_columns(
    ("speedup_vs_eager", "x eager", ".2f"),
    ("speedup_vs_compiled", "x compiled", ".2f"),
    ("checks", "checks", ""),
    pct="% HBM (of bound)",
)


def main(argv=None) -> int:
    parser = harness.script_arg_parser(OP, __doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    return harness.run_op_benchmark(
        OP,
        args,
        lambda device, smoke: backends_for(device, compile_baseline=not args.no_compile and not smoke),
        configs,
        benchmark_config,
        TABLE_COLUMNS,
        bytes_formula="V*d*sizeof(W) (W read once), + M*V*4 when return_probs (probabilities written once)",
        inputs=f"hidden ~ N(0, 1), W ~ N(0, 9/d), seed 0; k={TOP_K}, temperature={TEMPERATURE}",
    )


# ----------------------------------------------------------------------------------------------
# pytest-benchmark mode: `pytest bench/bench_lm_head_topk.py` (bench/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------

_PYTEST_BACKENDS = ("reference", "eager") if harness.PYTEST_SMOKE else ("triton", "eager")


@pytest.mark.parametrize("backend", _PYTEST_BACKENDS)
@pytest.mark.parametrize("config", configs(smoke=harness.PYTEST_SMOKE, quick=False), ids=str)
def test_lm_head_topk(benchmark, config: Config, backend: str) -> None:
    fn, problems = run_checked(backend, config, harness.PYTEST_DEVICE)
    assert not problems, problems
    harness.pytest_benchmark(benchmark, fn, config, config.bytes_bound)


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
