"""Benchmark of rejection resampling, ``crossspec_kernels.verify``, against an eager PyTorch baseline.

Two ways to run it, from the repository root:

    python bench/bench_verify.py [--out results.json] [--quick] [--compile]   # table + JSON
    pytest bench/bench_verify.py                                             # pytest-benchmark

Shapes: chains of k ∈ {4, 8} draft tokens, B ∈ {1, 8, 64}, V = 32064 (Vicuna-7B / Video-LLaVA),
fp32 and bf16 logits, in three modes: greedy (T = 0), sampled with draft_probs (recursive rejection
sampling, T = 1) and sampled with deterministic candidates (draft_probs None, T = 1). Inputs come
from crossspec_kernels.testing.make_case: 70% of the drafts are the target's choice, so greedy and
draft_probs walks go deep; with deterministic candidates at T = 1 the random target is flat and most
walks stop early (the "mean acc" column shows the accepted length of every run).

Bytes moved are counted as the inputs an ideal kernel must read once: B·(k+1)·V·sizeof(logits),
plus the same for draft_probs when given. GB/s and % of the device's HBM peak follow from that.

The baseline, measured in the same run, is a straightforward eager PyTorch chain verifier in the
style of Hugging Face's assisted decoding and gpt-fast (below, ``eager_*``): argmax or softmax over
every position at once, compare/accept with a cumprod, gather the correction/bonus token. Its greedy
tokens must equal ours exactly (checked on every benchmark input); its sampled outputs use other
random numbers, so only their validity is checked. A ``torch.compile`` of it is an extra baseline
with --compile (one compile per shape: minutes).

A second table times the host side of one call the way the engine's round makes it (tensors for
temperature/seed/offset, preallocated ``out``, no tree validation) at B = 1, k = 5, V = 49152 and
V = 512: on a GPU that is the enqueue cost per call, on CPU the whole call.

Without a CUDA device this runs a smoke mode (tiny shapes, torch and reference backends + eager baseline, a
few iterations) that proves the script works and claims nothing about speed.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import _common as harness
import pytest
import torch

import crossspec_kernels
from crossspec_kernels.reference import VerifyBuffers
from crossspec_kernels.testing import make_case

OP = "verify"
VOCAB = 32064  # Vicuna-7B, the Video-LLaVA language model
SMOKE_VOCAB = 1000
TEMPERATURE = 1.0  # sampled modes
SEED = 1234
CASE_SEED = 0

MODES = {
    # name: (temperature, draft_probs given, what it is)
    "greedy": (0.0, False, "T=0: follow the target argmax"),
    "sampled_probs": (TEMPERATURE, True, "T=1, draft_probs given: recursive rejection sampling"),
    "sampled_det": (TEMPERATURE, False, "T=1, draft_probs None: deterministic candidates"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str
    batch: int
    num_nodes: int  # k, the chain length
    vocab: int
    dtype: torch.dtype

    @property
    def temperature(self) -> float:
        return MODES[self.mode][0]

    @property
    def with_probs(self) -> bool:
        return MODES[self.mode][1]

    @property
    def bytes_read(self) -> int:
        """Logits (and draft_probs) read once: B·(k+1)·V·sizeof, per tensor."""
        per_tensor = self.batch * (self.num_nodes + 1) * self.vocab * self.dtype.itemsize
        return per_tensor * (2 if self.with_probs else 1)

    def __str__(self) -> str:
        return f"{self.mode}-B{self.batch}-k{self.num_nodes}-V{self.vocab}-{harness.DTYPE_NAMES[self.dtype]}"


def configs(*, smoke: bool, quick: bool) -> list[Config]:
    if smoke:
        batches, chain_lengths, vocab = ((3,), (4,), SMOKE_VOCAB) if quick else ((1, 3), (4,), SMOKE_VOCAB)
        dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    else:
        batches, chain_lengths, vocab = ((1, 64), (8,), VOCAB) if quick else ((1, 8, 64), (4, 8), VOCAB)
        dtypes = (torch.float32, torch.bfloat16)
    return [
        Config(mode, batch, k, vocab, dtype)
        for mode in MODES
        for dtype in dtypes
        for k in chain_lengths
        for batch in batches
    ]


@functools.cache
def _host_case(batch: int, num_nodes: int, vocab: int, with_probs: bool) -> dict:
    # One fp32 build per shape, shared by both dtypes and by greedy / sampled_det.
    return make_case(batch, num_nodes, vocab, with_probs=with_probs, temperature=TEMPERATURE, seed=CASE_SEED)


def make_inputs(config: Config, device: torch.device) -> dict:
    case = _host_case(config.batch, config.num_nodes, config.vocab, config.with_probs)
    probs = case["draft_probs"]
    return dict(
        target_logits=case["target_logits"].to(device=device, dtype=config.dtype),
        draft_tokens=case["draft_tokens"].to(device),
        draft_probs=None if probs is None else probs.to(device=device, dtype=config.dtype),
    )


# ----------------------------------------------------------------------------------------------
# Eager baseline: chain verification the way HF assisted decoding / gpt-fast write it
# ----------------------------------------------------------------------------------------------


def _assemble(draft_tokens: torch.Tensor, num_accepted: torch.Tensor, next_token: torch.Tensor):
    """tokens [B, k+1] = accepted drafts, next_token, then -1; path [B, k] = 0..n-1, then -1."""
    batch, num_nodes = draft_tokens.shape
    positions = torch.arange(num_nodes + 1, device=draft_tokens.device)
    accepted_len = num_accepted[:, None]
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(positions < accepted_len, padded, -1)
    tokens = torch.where(positions == accepted_len, next_token, tokens)
    path = torch.where(positions[:num_nodes] < accepted_len, positions[:num_nodes], -1)
    return crossspec_kernels.VerifyOutput(tokens, num_accepted, path)


def eager_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor):
    """Argmax at every position, accept the longest matching prefix, the argmax after it is the bonus."""
    target_tokens = target_logits.argmax(dim=-1)  # [B, k+1]
    matches = draft_tokens == target_tokens[:, :-1]
    num_accepted = matches.long().cumprod(dim=1).sum(dim=1)
    next_token = target_tokens.gather(1, num_accepted[:, None])
    return _assemble(draft_tokens, num_accepted, next_token)


def eager_rejection(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor, temperature: float
):
    """Speculative sampling (Leviathan et al., Chen et al.): accept x_i with prob min(1, p/q); at the
    first rejection sample norm((p - q)+); if all are accepted sample the bonus from p[k]."""
    batch, num_nodes = draft_tokens.shape
    vocab = target_logits.shape[-1]
    p = torch.softmax(target_logits.float() / temperature, dim=-1)  # [B, k+1, V]
    q = draft_probs.float()
    index = draft_tokens[:, :, None]
    p_draft = p[:, :num_nodes].gather(-1, index).squeeze(-1)  # [B, k]
    q_draft = q[:, :num_nodes].gather(-1, index).squeeze(-1)
    # u < p/q written as u·q < p: the same test without dividing by a zero q.
    accepted = torch.rand_like(p_draft) * q_draft < p_draft
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
    # Residual at every position (only the first rejected one is used), computed for all at once.
    residual = (p[:, :num_nodes] - q[:, :num_nodes]).clamp_(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass, p[:, :num_nodes])  # p == q never rejects
    distribution = torch.cat([residual, p[:, num_nodes:]], dim=1)  # row k: the bonus token's p
    samples = torch.multinomial(distribution.reshape(-1, vocab), 1).view(batch, num_nodes + 1)
    next_token = samples.gather(1, num_accepted[:, None])
    return _assemble(draft_tokens, num_accepted, next_token)


def eager_candidates(target_logits: torch.Tensor, draft_tokens: torch.Tensor, temperature: float):
    """Deterministic drafts: sample y_i ~ p_i at every position, accept while y_i equals the draft,
    emit the first y_i that differs (or the bonus sample)."""
    batch, num_nodes = draft_tokens.shape
    vocab = target_logits.shape[-1]
    p = torch.softmax(target_logits.float() / temperature, dim=-1)
    samples = torch.multinomial(p.reshape(-1, vocab), 1).view(batch, num_nodes + 1)
    matches = draft_tokens == samples[:, :num_nodes]
    num_accepted = matches.long().cumprod(dim=1).sum(dim=1)
    next_token = samples.gather(1, num_accepted[:, None])
    return _assemble(draft_tokens, num_accepted, next_token)


def eager_verify(config: Config, inputs: dict, fn=None):
    fn = fn or _BASELINE_FNS[config.mode]
    logits, drafts = inputs["target_logits"], inputs["draft_tokens"]
    if config.mode == "greedy":
        return fn(logits, drafts)
    if config.mode == "sampled_probs":
        return fn(logits, drafts, inputs["draft_probs"], config.temperature)
    return fn(logits, drafts, config.temperature)


_BASELINE_FNS = {"greedy": eager_greedy, "sampled_probs": eager_rejection, "sampled_det": eager_candidates}


@functools.cache
def _compiled(mode: str):
    harness.raise_recompile_limit()
    return torch.compile(_BASELINE_FNS[mode], dynamic=False)


# ----------------------------------------------------------------------------------------------
# Backends, checks
# ----------------------------------------------------------------------------------------------

OUR_BACKENDS = ("cuda", "triton", "torch", "reference")
BASELINES = ("eager", "compiled")


def backends_for(device: torch.device, *, compile_baseline: bool = False) -> tuple[list[str], list[str]]:
    """(backends to time, notes on those left out)."""
    if device.type != "cuda":
        return ["torch", "reference", "eager"], ["cuda, triton: no CUDA device"]
    chosen, notes = harness.kernel_backends()
    notes.insert(0, harness.ORACLE_NOTE)
    chosen += ["torch", "eager"]
    if compile_baseline:
        chosen.append("compiled")
    else:
        notes.append("compiled: torch.compile baseline off (pass --compile)")
    return chosen, notes


def op_callable(backend: str, config: Config, inputs: dict, *, validate_tree: bool = False):
    """A zero-argument call of one backend on one config, as timed. validate_tree=False: reading the
    parents' values is a host sync, which must not be in the timed region; run_checked validates."""
    if backend == "eager":
        return lambda: eager_verify(config, inputs)
    if backend == "compiled":
        return lambda: eager_verify(config, inputs, _compiled(config.mode))
    return functools.partial(
        crossspec_kernels.verify,
        inputs["target_logits"],
        inputs["draft_tokens"],
        None,  # a chain
        inputs["draft_probs"],
        temperature=config.temperature,
        seed=SEED,
        backend=backend,
        validate_tree=validate_tree,
    )


def run_checked(backend: str, config: Config, inputs: dict):
    """One untimed call with full validation; also warms up (Triton compile, torch.compile trace)."""
    out = op_callable(backend, config, inputs, validate_tree=True)()
    harness.synchronize(inputs["target_logits"].device)
    return out


def check_chain_output(out, draft_tokens: torch.Tensor, vocab: int) -> list[str]:
    """Contract invariants of a chain's output, vectorised; returns the violations found."""
    batch, num_nodes = draft_tokens.shape
    problems = []
    tokens, num_accepted, path = (t.cpu() for t in out)
    if tokens.shape != (batch, num_nodes + 1) or path.shape != (batch, num_nodes):
        return [f"shapes tokens {tuple(tokens.shape)} path {tuple(path.shape)}"]
    if num_accepted.shape != (batch,) or any(t.dtype != torch.int64 for t in (tokens, num_accepted, path)):
        return [f"num_accepted shape {tuple(num_accepted.shape)} or dtypes not int64"]
    draft_tokens = draft_tokens.cpu()
    if not bool(((num_accepted >= 0) & (num_accepted <= num_nodes)).all()):
        return [f"num_accepted out of [0, {num_nodes}]: {num_accepted.tolist()}"]
    positions = torch.arange(num_nodes + 1)
    accepted_len = num_accepted[:, None]
    in_prefix = positions[:num_nodes] < accepted_len
    if not bool(torch.where(in_prefix, tokens[:, :num_nodes] == draft_tokens, True).all()):
        problems.append("accepted tokens differ from the drafts")
    if not bool(torch.where(in_prefix, path == positions[:num_nodes], path == -1).all()):
        problems.append("path is not 0..n-1 then -1")
    next_token = tokens.gather(1, accepted_len).squeeze(1)
    if not bool(((next_token >= 0) & (next_token < vocab)).all()):
        problems.append(f"correction/bonus token out of [0, {vocab}): {next_token.tolist()}")
    if not bool(torch.where(positions > accepted_len, tokens == -1, True).all()):
        problems.append("tokens are not -1 after the correction/bonus token")
    return problems


def same_output(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def check_backend(backend: str, config: Config, inputs: dict, reference_out=None) -> tuple[object, list[str]]:
    """Run once outside the timed region and check it: (output, problems)."""
    out = run_checked(backend, config, inputs)
    problems = check_chain_output(out, inputs["draft_tokens"], config.vocab)
    if reference_out is not None and backend != "reference":
        exact = config.mode == "greedy" or backend not in BASELINES
        if exact and not same_output(out, reference_out):
            # Greedy is deterministic, so the baselines must agree exactly; our backends share the
            # Philox stream with the reference, so they must agree in every mode.
            problems.append(f"{backend} differs from the reference on the same inputs and seed")
    return out, problems


# ----------------------------------------------------------------------------------------------
# Host time per call, as the engine's round calls verify
# ----------------------------------------------------------------------------------------------

# (B, k, V): one request, gamma 5, a 135M-class vocabulary (SmolLM2: 49152) and a tiny one, where
# the op's fixed cost (validation, dispatch, allocation, Python) is all there is.
HOST_SHAPES = ((1, 5, 49152), (1, 5, 512))
HOST_ITERATIONS = 200


def host_time_rows(device: torch.device, backends: list[str]) -> tuple[list[dict], list[str]]:
    """Host microseconds per verify call the way a round makes it: temperature, seed and offset as
    [B] device tensors, preallocated ``out`` buffers, validate_tree=False. On a GPU no call waits for
    the device (this is the enqueue cost a CUDA graph removes); on CPU it is the whole call. Greedy is
    also timed with ``temperature=0.0`` as a Python float, which lets the torch backend skip the
    sampling work (a [B] tensor of zeros cannot be read without a sync)."""
    rows, problems = [], []
    ours_backends = [b for b in backends if b in OUR_BACKENDS]
    for batch, num_nodes, vocab in HOST_SHAPES:
        for mode in MODES:
            config = Config(mode, batch, num_nodes, vocab, torch.float32)
            inputs = make_inputs(config, device)
            tensors = dict(
                temperature=torch.full((batch,), config.temperature, device=device),
                seed=torch.full((batch,), SEED, dtype=torch.int64, device=device),
                offset=torch.zeros(batch, dtype=torch.int64, device=device),
            )
            variants = [("tensors", tensors)]
            if mode == "greedy":
                variants.append(("float T=0", dict(tensors, temperature=0.0)))
            for variant, sampling in variants:
                expected = crossspec_kernels.verify(**inputs, **sampling, backend="reference")
                for backend in ours_backends:
                    call = functools.partial(
                        crossspec_kernels.verify,
                        **inputs,
                        **sampling,
                        backend=backend,
                        validate_tree=False,
                        out=VerifyBuffers.empty(batch, num_nodes, device),
                    )
                    if not same_output(call(), expected):
                        problems.append(f"host time {config} {variant} {backend}: differs from the reference")
                    timing = harness.time_cpu(call, iterations=HOST_ITERATIONS, warmup=10)  # no device sync
                    rows.append(
                        dict(
                            config=str(config),
                            sampling=variant,
                            backend=backend,
                            host_median_us=timing.median_us,
                            host_p20_us=timing.p20_us,
                            host_p80_us=timing.p80_us,
                            threads=torch.get_num_threads(),
                        )
                    )
    return rows, problems


HOST_TABLE_COLUMNS = (
    ("config", "config", ""),
    ("sampling", "sampling", ""),
    ("backend", "backend", ""),
    ("host_median_us", "host us", ".1f"),
    ("host_p20_us", "p20", ".1f"),
    ("host_p80_us", "p80", ".1f"),
)


def host_time_report(rows, device, info, backends) -> tuple[dict, list[str]]:
    print(f"\nhost time per call (round-style call, {torch.get_num_threads()} threads):")
    host_rows, problems = host_time_rows(device, backends)
    print(harness.format_table(host_rows, HOST_TABLE_COLUMNS))
    method = f"time.perf_counter per call, {HOST_ITERATIONS} calls after 10 warm-up calls, no device sync"
    calls = host_time_rows.__doc__.split(". On a GPU")[0]
    return dict(host_time=dict(method=method, calls=calls, rows=host_rows)), problems


# ----------------------------------------------------------------------------------------------
# Script mode
# ----------------------------------------------------------------------------------------------


def benchmark_config(config: Config, device, info, backends: list[str], *, quick: bool):
    inputs = make_inputs(config, device)
    # The reference is the oracle: every backend must match it exactly, the baselines in greedy.
    reference_out, problems = check_backend("reference", config, inputs)
    problems = [f"{config} reference: {p}" for p in problems]

    def prepare(backend):
        out, found = check_backend(backend, config, inputs, reference_out)
        return (
            op_callable(backend, config, inputs),
            dict(mean_accepted=float(out.num_accepted.float().mean())),
            found,
        )

    fields = harness.config_fields(config, num_nodes="k")
    rows, found = harness.measure_backends(
        config,
        backends,
        prepare,
        device=device,
        info=info,
        quick=quick,
        num_bytes=config.bytes_read,
        fields=fields,
    )
    harness.add_speedups(rows, ["eager"])
    return rows, problems + found


TABLE_COLUMNS = harness.op_columns(
    ("speedup_vs_eager", "x eager", ".2f"), ("mean_accepted", "mean acc", ".2f"), ("checks", "checks", "")
)


def main(argv=None) -> int:
    parser = harness.script_arg_parser(OP, __doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the baseline")
    args = parser.parse_args(argv)

    def backends(device, smoke):
        if smoke and args.compile:
            print("--compile is ignored in the CPU smoke test")
        return backends_for(device, compile_baseline=args.compile and not smoke)

    return harness.run_op_benchmark(
        OP,
        args,
        backends,
        configs,
        benchmark_config,
        TABLE_COLUMNS,
        after=host_time_report,
        bytes_formula="B*(k+1)*V*sizeof(logits dtype), doubled when draft_probs is given",
        inputs=(
            "crossspec_kernels.testing.make_case(B, k, V, with_probs, temperature=1.0, seed=0): chains, 70% of "
            f"drafts are the target's choice; verify seed={SEED}, sampled temperature={TEMPERATURE}"
        ),
        modes={name: description for name, (_, _, description) in MODES.items()},
    )


# ----------------------------------------------------------------------------------------------
# pytest-benchmark mode: `pytest bench/bench_verify.py` (bench/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------

_PYTEST_BACKENDS = (
    ("torch", "reference", "eager") if harness.PYTEST_SMOKE else ("cuda", "triton", "torch", "eager")
)


@functools.cache
def _pytest_inputs(config: Config) -> dict:
    return make_inputs(config, harness.PYTEST_DEVICE)


@functools.cache
def _pytest_reference(config: Config):
    return run_checked("reference", config, _pytest_inputs(config))


@pytest.mark.parametrize("backend", _PYTEST_BACKENDS)
@pytest.mark.parametrize("config", configs(smoke=harness.PYTEST_SMOKE, quick=False), ids=str)
def test_verify(benchmark, config: Config, backend: str) -> None:
    if backend == "cuda" and not harness.extension_built():
        pytest.skip("crossspec_kernels._C is not built")
    inputs = _pytest_inputs(config)
    reference_out = None if backend == "reference" else _pytest_reference(config)
    out, problems = check_backend(backend, config, inputs, reference_out)
    assert not problems, problems
    fn = op_callable(backend, config, inputs)
    harness.pytest_benchmark(
        benchmark, fn, config, config.bytes_read, mean_accepted=float(out.num_accepted.float().mean())
    )


@pytest.mark.parametrize(
    "config", [c for c in configs(smoke=harness.PYTEST_SMOKE, quick=False) if c.mode == "greedy"], ids=str
)
def test_eager_greedy_matches_ours(config: Config) -> None:
    """The baseline is a fair one only if it computes the same thing: greedy tokens must be equal."""
    inputs = _pytest_inputs(config)
    ours = run_checked(
        "cuda" if harness.extension_built() and not harness.PYTEST_SMOKE else "reference", config, inputs
    )
    assert same_output(eager_greedy(inputs["target_logits"], inputs["draft_tokens"]), ours)
    assert int(ours.num_accepted.sum()) > 0, "the benchmark inputs must accept drafts"


if __name__ == "__main__":
    sys.exit(main())
