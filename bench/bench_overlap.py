"""Prefill hiding on one GPU: how much of the drafter's work hides under the target's prefill.

Run from the repository root:

    python bench/bench_overlap.py [--preset tiny|7b] [--out DIR_OR_JSON] [--quick] [--drafter-sms N]
    pytest bench/bench_overlap.py                                  # the CPU smoke test
    python bench/plot_overlap.py RESULTS.json --out DIR             # timeline and speedup plots

Mechanism variants (each measured on the same models and inputs, greedy, batch 1):

* ``sequential``: ``CrossSpecEngine(overlap=False)``; the drafter waits for the target's prefill.
* ``two_streams``: two CUDA streams of equal (normal) priority, ``streams=(Stream(), Stream())``.
* ``priority``: the engine's default, a high-priority drafter stream beside a normal target stream.
* ``green_contexts``: complementary SM partitions (``runtime.partition.GreenContextStreams``), the split
  chosen by ``choose_partition`` from the drafter's step latency versus SM count, or ``--drafter-sms``.
* ``green_contexts+graphs``: as ``green_contexts``, with every block forward (the drafter's chain steps,
  and in the end-to-end rows also the target's verification) replayed as a CUDA graph
  (``ModelRunner(step_mode="cuda_graph")``, the engine's ``step_mode="cuda_graph"``).

Per variant, with the drafter work = drafter prefill + k greedy chain steps (k = --free-token-budget):

    T_p  target prefill alone (full device, current stream)     T_d  drafter work alone (full device)
    M    makespan of both launched together on the variant's streams (target prefill in a worker
         thread, as the engine does), from a common origin event to the later end
    h    hidden fraction = (T_p + T_d - M) / T_d            s  target slowdown = co-run prefill / T_p

Times are CUDA events (medians over --repeats) on a GPU; on CPU ``time.perf_counter`` (a smoke test that
claims nothing). The co-run's spans (target.prefill, draft.prefill, draft.step[i]) are recorded as a
timeline in ms from the common origin (``variants.<name>.timeline``). End to end, per variant and
controlled acceptance alpha (``runtime.controlled``; reference = target.generate's greedy tokens, a few
longer than --max-new-tokens): ``CrossSpecEngine.generate`` with ``ChainDraft(--gamma)``: TTFT, tokens/s,
free tokens, measured acceptance, speedup over ``target.generate`` and over HF assisted generation at the
same alpha (a text-only Llama assistant whose greedy token is replaced, with probability alpha, by the
reference token, as ``ControlledAcceptance`` does for our drafter; bench_e2e's text-drafter approach), and
system efficiency against bench_e2e's analytic model (imported, not duplicated).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import sys

import _common as harness
import torch
from bench_e2e import ANALYTIC_MODEL, analytic
from models import SEED, Setup, build_assistant, setup_for, use_native_attention

from crossspec_kernels import hf
from crossspec_kernels.runtime import ChainDraft, ControlledAcceptance, CrossSpecEngine

# Runtime internals, on purpose: T_d and the co-run timeline time the drafter's prefill and each of its
# chain steps outside the engine, on chosen streams; the engine's public stats give only totals.
from crossspec_kernels.runtime.drafting import DraftModel
from crossspec_kernels.runtime.runner import ModelRunner, graph_capture_available
from crossspec_kernels.runtime.stages import StageTimer

OP = "overlap"
DRAFTERS_7B = ("eventgpt-1b", "eventgpt-7b")
VARIANTS = ("sequential", "two_streams", "priority", "green_contexts", "green_contexts+graphs")
ALPHAS = (0.2, 0.5, 0.8)
GOAL_DRAFTER_7B = "eventgpt-1b"
GOALS = dict(
    hidden_fraction=(">=", 0.9),
    target_slowdown=("<=", 1.15),
    free_tokens=(">=", 20),
    system_efficiency=(">=", 0.9),
    speedup_vs_target_generate=(">=", 2.5),
    speedup_vs_hf_assisted=(">=", 1.5),
)
GOAL_ALPHA = 0.8
CUDA_ONLY = {
    "two_streams": "needs CUDA streams: on CPU the engine has no streams, so equal-priority streams do not exist",
    "green_contexts": "needs CUDA green contexts (SM partitions): no CUDA device",
    "green_contexts+graphs": "needs CUDA green contexts and CUDA graph capture: no CUDA device",
}
DEFINITIONS = dict(
    T_p_ms="target prefill alone on the full device (current stream), harness.median over repeats",
    T_d_ms="drafter prefill + k greedy chain steps alone on the full device (k = free_token_budget)",
    M_ms="co-run makespan on the variant's streams: common origin event to the later of both ends",
    hidden_fraction="h = (T_p + T_d - M) / T_d",
    target_slowdown="s = target prefill time while co-running / T_p",
    alone_on_variant_streams="T_p and T_d each alone on the variant's own streams (inside a partition for "
    "green contexts), for reference; h and s use the full-device T_p and T_d",
    free_tokens="engine stats free_tokens (drafts finished before the target's prefill), harness.median over runs",
    speedup_vs_target_generate="target.generate total ms / engine total ms (medians)",
    speedup_vs_hf_assisted="HF assisted total ms at the same alpha and gamma / engine total ms (medians)",
    system_efficiency="bench_e2e analytic model: measured speedup / predicted speedup",
)


# ----------------------------------------------------------------------------------------------
# Timing clock and the two pieces of work
# ----------------------------------------------------------------------------------------------


def _on(stream):
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


class Work:
    """The target's prefill and the drafter's work (prefill + k chain steps), each as timed spans."""

    def __init__(self, target, target_inputs, drafter, adapter, drafter_inputs, steps, backend, device):
        self.target = hf.enable(target)
        self.drafter = hf.enable(drafter)
        self.target_inputs, self.drafter_inputs = target_inputs, drafter_inputs
        self.adapter, self.steps, self.backend, self.device = adapter, steps, backend, device
        self.lm_head_weight = target.get_output_embeddings().weight
        self.step_mode = "eager"  # the drafter's block forwards; "cuda_graph" for green_contexts+graphs

    @property
    def _kernel_backend(self):
        return "triton" if self.backend == "cuda" else self.backend

    def target_prefill(self, clock: StageTimer, stream) -> list[tuple]:
        backend = "reference" if self.device.type == "cpu" else self._kernel_backend
        with contextlib.ExitStack() as stack:
            if stream is not None:
                stack.enter_context(torch.cuda.device(self.device))
                stack.enter_context(torch.cuda.stream(stream))
            stack.enter_context(hf.attention_backend(backend))
            stack.enter_context(torch.no_grad())
            runner = _runner(self.target, self.target_inputs, 0, None, "eager")
            start = clock.mark()
            runner.prefill(self.target_inputs)
            return [("target.prefill", start, clock.mark())]

    def drafter_work(self, clock: StageTimer, stream) -> list[tuple]:
        with _on(stream), hf.attention_backend(self._kernel_backend), torch.no_grad():
            runner = _runner(
                self.drafter, self.drafter_inputs, self.steps, self._kernel_backend, self.step_mode
            )
            model = DraftModel(runner, self.adapter, self.lm_head_weight, clock, self._kernel_backend)
            start = clock.mark()
            hidden = model.prefill(self.drafter_inputs)
            prefill_end = clock.mark()
            proposal = model.chain(hidden, ChainDraft(self.steps), temperature=0.0)
        spans = [("draft.prefill", start, prefill_end)]
        previous = prefill_end
        for index, mark in enumerate(proposal.timestamps):
            spans.append((f"draft.step[{index}]", previous, mark))
            previous = mark
        return spans


def _runner(model, inputs: dict, steps: int, kernel, step_mode: str) -> ModelRunner:
    """A ModelRunner with a cache for the prompt plus ``steps`` tokens (the engine's runtime pieces)."""
    runner = ModelRunner(model, kernel=kernel, step_mode=step_mode)
    ids = inputs["input_ids"]
    runner.allocate(
        ids.shape[0], ids.shape[1] + steps + 2, model.get_input_embeddings().weight.dtype, ids.device
    )
    return runner


def _span_ms(clock: StageTimer, origin, spans) -> list[dict]:
    return [
        dict(name=name, start_ms=clock.elapsed_ms(origin, start), end_ms=clock.elapsed_ms(origin, end))
        for name, start, end in spans
    ]


def _run_alone(work: Work, which: str, stream, device) -> float:
    clock = StageTimer(device)
    harness.synchronize(device)
    origin = clock.mark()
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
    spans = work.target_prefill(clock, stream) if which == "target" else work.drafter_work(clock, stream)
    harness.synchronize(device)
    return max(item["end_ms"] for item in _span_ms(clock, origin, spans))


def _co_run(work: Work, streams, sequential: bool, device) -> dict:
    """Both pieces of work from one origin; returns makespan, target prefill time and the timeline."""
    drafter_stream, target_stream = streams
    clock = StageTimer(device)
    harness.synchronize(device)
    origin = clock.mark()
    for stream in (drafter_stream, target_stream):
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
    if sequential:  # the engine with overlap=False: target prefill, then the drafter
        target_spans = work.target_prefill(clock, target_stream)
        if drafter_stream is not None:
            drafter_stream.wait_stream(target_stream)
        drafter_spans = work.drafter_work(clock, drafter_stream)
    else:  # as the engine does: the target's launches from a worker thread, the drafter's from here
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:
            future = worker.submit(work.target_prefill, clock, target_stream)
            drafter_spans = work.drafter_work(clock, drafter_stream)
            target_spans = future.result()
    harness.synchronize(device)
    target = _span_ms(clock, origin, target_spans)
    drafter = _span_ms(clock, origin, drafter_spans)
    return dict(
        makespan_ms=max(item["end_ms"] for item in target + drafter),
        target_prefill_ms=target[0]["end_ms"] - target[0]["start_ms"],
        timeline=dict(target=target, drafter=drafter),
    )


def measure_overlap(work: Work, variant: str, streams, baseline: dict, repeats: int, device) -> dict:
    sequential = variant == "sequential"
    drafter_stream, target_stream = streams
    _co_run(work, streams, sequential, device)  # warm-up (allocator, Triton compiles, graph pools)
    runs = [_co_run(work, streams, sequential, device) for _ in range(repeats)]
    makespans = [run["makespan_ms"] for run in runs]
    median_m = harness.median(makespans)
    shown = min(runs, key=lambda run: abs(run["makespan_ms"] - median_m))
    alone_p = harness.median(_run_alone(work, "target", target_stream, device) for _ in range(repeats))
    alone_d = harness.median(_run_alone(work, "drafter", drafter_stream, device) for _ in range(repeats))
    t_p, t_d = baseline["T_p_ms"], baseline["T_d_ms"]
    co_prefill = harness.median(run["target_prefill_ms"] for run in runs)
    return dict(
        T_p_ms=t_p,
        T_d_ms=t_d,
        M_ms=median_m,
        M_quantiles_ms=harness.quantiles(makespans),
        target_prefill_co_run_ms=co_prefill,
        hidden_fraction=(t_p + t_d - median_m) / t_d if t_d > 0 else None,
        target_slowdown=co_prefill / t_p if t_p > 0 else None,
        alone_on_variant_streams=dict(T_p_ms=alone_p, T_d_ms=alone_d),
        timeline=dict(
            origin="common origin event recorded before either piece of work was launched",
            unit="ms",
            clock="CUDA events" if device.type == "cuda" else "time.perf_counter (CPU smoke test)",
            run="the co-run repeat whose makespan is closest to the median",
            lanes=shown["timeline"],
        ),
    )


# ----------------------------------------------------------------------------------------------
# Mechanism variants: streams (and what cannot run here)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Mechanism:
    name: str
    streams: tuple = (None, None)  # (drafter stream, target stream); engine streams= when given
    engine_streams: tuple | None = None
    step_mode: str = "eager"  # the engine's
    overlap: bool = True
    skipped: str | None = None
    details: dict = dataclasses.field(default_factory=dict)
    close: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)


def _drafter_step_fn(work: Work):
    """One greedy drafter block forward of one token at the end of its prompt (nothing committed)."""
    runner = _runner(work.drafter, work.drafter_inputs, 1, work._kernel_backend, "eager")
    with torch.no_grad(), hf.attention_backend(work._kernel_backend):
        runner.prefill(work.drafter_inputs)
    token = torch.ones(runner.cache.batch, 1, dtype=torch.int64, device=work.device)
    depth = torch.zeros_like(token)

    def step():
        with torch.no_grad(), hf.attention_backend(work._kernel_backend):
            runner.forward(token, depth)

    return step


def _green_partition(work: Work, args, device) -> tuple[object, dict]:
    from crossspec_kernels.runtime import partition as part

    available, reason = part.green_contexts_available(device)
    if not available:
        raise _Skip(f"green contexts unavailable: {reason}")
    if args.drafter_sms is not None:
        props = torch.cuda.get_device_properties(device)
        granularity, minimum = part.partition_rules(props.major, props.minor)
        chosen = part.plan_partition(
            props.multi_processor_count, granularity, minimum, drafter_sms=args.drafter_sms
        )
        return chosen, dict(partition_source=f"--drafter-sms {args.drafter_sms}")
    chosen, latencies = part.choose_partition(_drafter_step_fn(work), device)
    return chosen, dict(
        partition_source="choose_partition: drafter step latency vs SM count",
        drafter_step_latency_ms_by_sms={str(sms): ms for sms, ms in latencies.items()},
    )


class _Skip(Exception):
    """A variant that cannot run on this machine; the message is the reason."""


def _partition_dict(chosen) -> dict:
    return {
        name: getattr(chosen, name, None)
        for name in ("drafter_sms", "target_sms", "total_sms", "granularity")
    }


def _graphed_drafter(work: Work, device) -> None:
    """Switch the drafter's block forwards to CUDA graph replays (or skip the variant, saying why)."""
    available, reason = graph_capture_available(device)
    if not available:
        raise _Skip(f"CUDA graph capture unavailable: {reason}")
    work.step_mode = "cuda_graph"


def make_mechanism(name: str, work: Work, args, device) -> Mechanism:
    if name == "sequential":
        return Mechanism(name, overlap=False, details=dict(engine="CrossSpecEngine(overlap=False)"))
    if device.type != "cuda":
        if name == "priority":
            return Mechanism(
                name,
                details=dict(
                    engine="CrossSpecEngine defaults (CPU: no streams, the target's prefill in a worker "
                    "thread beside the drafter)"
                ),
            )
        return Mechanism(name, skipped=CUDA_ONLY[name])
    if name == "two_streams":
        streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return Mechanism(
            name, streams, streams, details=dict(engine="streams=(Stream(), Stream()), priority 0")
        )
    if name == "priority":
        high = torch.cuda.Stream.priority_range()[1]
        streams = (torch.cuda.Stream(device, priority=high), torch.cuda.Stream(device))
        return Mechanism(
            name, streams, None, details=dict(engine=f"CrossSpecEngine defaults (drafter priority {high})")
        )
    mechanism = Mechanism(name)
    try:
        chosen, details = _green_partition(work, args, device)
        from crossspec_kernels.runtime.partition import GreenContextStreams

        manager = GreenContextStreams(chosen, device)
        entered = mechanism.close.enter_context(manager)
        green = entered if hasattr(entered, "drafter_stream") else manager
        streams = (green.drafter_stream, green.target_stream)
        mechanism.streams, mechanism.engine_streams = streams, streams
        mechanism.details = dict(details, partition=_partition_dict(chosen), engine="streams=green contexts")
        if name == "green_contexts+graphs":
            mechanism.step_mode = "cuda_graph"
            mechanism.details["graphed"] = (
                "T_d, M, h, s and the timeline replay the drafter's chain steps as CUDA graphs on the drafter "
                "partition; the end-to-end rows run CrossSpecEngine(step_mode='cuda_graph') on the same green "
                "contexts"
            )
    except _Skip as skip:
        mechanism.close.close()
        mechanism.skipped = str(skip)
    except ImportError as error:
        mechanism.close.close()
        mechanism.skipped = f"module not available: {error}"
    return mechanism


# ----------------------------------------------------------------------------------------------
# End to end: target.generate, HF assisted and the engine under controlled acceptance
# ----------------------------------------------------------------------------------------------


def _controlled(reference, alpha, device):
    return ControlledAcceptance(reference.to(device), alpha, seed=SEED)


def run_generate(setup: Setup, args, device, new_tokens, assistant=None, alpha=None, reference=None):
    """target.generate (assistant None) or HF assisted with a fixed chain of --gamma drafts, its
    proposals under controlled acceptance ``alpha``."""
    target, inputs = setup.target, setup.target_inputs
    use_native_attention(target, assistant)
    if assistant is None:
        return harness.timed_generate(target, inputs, new_tokens, device)
    acceptance = _controlled(reference, alpha, device)
    shared = min(assistant.config.vocab_size, target.get_output_embeddings().weight.shape[0])
    acceptance.check(inputs["input_ids"].shape[0], shared, device)
    assistant.control = dict(acceptance=acceptance, prompt_len=inputs["input_ids"].shape[1])
    try:
        return harness.timed_generate(
            target, inputs, new_tokens, device, assistant=assistant, gamma=args.gamma
        )
    finally:
        assistant.control = None


def run_engine(setup, work: Work, mechanism: Mechanism, args, device, alpha, reference) -> dict:
    engine = CrossSpecEngine(
        setup.target,
        work.drafter,
        work.adapter,
        draft=ChainDraft(args.gamma),
        free_token_budget=args.free_token_budget,
        backend=args.backend,
        overlap=mechanism.overlap,
        streams=mechanism.engine_streams,
        step_mode=mechanism.step_mode,
    )
    controlled = _controlled(reference, alpha, device)
    return harness.timed_engine(
        engine,
        setup.target_inputs,
        work.drafter_inputs,
        args.max_new_tokens,
        device,
        controlled_acceptance=controlled,
    )


def measure_baselines(setup, args, device, assistant, reference) -> tuple[dict, list[str]]:
    problems = []
    n = args.max_new_tokens
    for _ in range(args.warmup):
        run_generate(setup, args, device, n)
    runs = [run_generate(setup, args, device, n) for _ in range(args.repeats)]
    ar = dict(config="target.generate", **harness.time_summary(runs, n))
    hf_rows = {}
    for alpha in ALPHAS:
        for _ in range(args.warmup if alpha == ALPHAS[0] else 0):
            run_generate(setup, args, device, n, assistant, alpha, reference)
        runs = [
            run_generate(setup, args, device, n, assistant, alpha, reference) for _ in range(args.repeats)
        ]
        row = dict(config=f"hf_assisted-g{args.gamma}-a{alpha}", alpha=alpha, **harness.time_summary(runs, n))
        rounds = harness.median(run["rounds"] for run in runs)
        row["rounds"] = rounds
        row["acceptance_rate"] = (n / rounds - 1) / args.gamma if rounds else None
        problems += harness.check_tokens(row, runs, reference, setup.dtype, row["config"])
        hf_rows[str(alpha)] = row
    return dict(target_generate=ar, hf_assisted=hf_rows), problems


def measure_end_to_end(setup, work, mechanism, args, device, reference, baselines) -> tuple[dict, list[str]]:
    problems, rows = [], {}
    n = args.max_new_tokens
    ar = baselines["target_generate"]
    for _ in range(args.warmup):
        run_engine(setup, work, mechanism, args, device, ALPHAS[-1], reference)
    for alpha in ALPHAS:
        runs = [
            run_engine(setup, work, mechanism, args, device, alpha, reference) for _ in range(args.repeats)
        ]
        label = f"{mechanism.name} alpha {alpha}"
        row = dict(
            kind="ours", alpha=alpha, draft=str(ChainDraft(args.gamma)), **harness.time_summary(runs, n)
        )
        stats, found = harness.engine_summary(runs, label)
        row.update(stats)
        problems += found + harness.check_tokens(row, runs, reference, setup.dtype, label)
        row["speedup_vs_target_generate"] = ar["total_ms"]["median"] / row["total_ms"]["median"]
        row["ttft_speedup_vs_target_generate"] = ar["ttft_ms"]["median"] / row["ttft_ms"]["median"]
        hf_row = baselines["hf_assisted"][str(alpha)]
        row["speedup_vs_hf_assisted"] = hf_row["total_ms"]["median"] / row["total_ms"]["median"]
        model = analytic(row, ar, n)
        row["analytic"] = model
        row["system_efficiency"] = None if model is None else model["system_efficiency"]
        rows[str(alpha)] = row
    return rows, problems


# ----------------------------------------------------------------------------------------------
# Goals
# ----------------------------------------------------------------------------------------------


def _check(value, goal, measured_on_gpu: bool):
    op, bound = goal
    passed = None
    if measured_on_gpu and value is not None:
        passed = value >= bound if op == ">=" else value <= bound
    return dict(value=value, goal=f"{op} {bound}", passed=passed)


def goals_block(drafters: dict, goal_drafter: str, on_gpu: bool) -> dict:
    """Per variant, the goal drafter's numbers against the issue's H100 goals (passed: null on CPU)."""
    per_variant = {}
    for name, variant in drafters.get(goal_drafter, {}).items():
        if variant.get("status") == "skipped":
            continue
        overlap = variant.get("overlap") or {}
        e2e = (variant.get("end_to_end") or {}).get(str(GOAL_ALPHA)) or {}
        values = dict(
            hidden_fraction=overlap.get("hidden_fraction"),
            target_slowdown=overlap.get("target_slowdown"),
            free_tokens=e2e.get("free_tokens"),
            system_efficiency=e2e.get("system_efficiency"),
            speedup_vs_target_generate=e2e.get("speedup_vs_target_generate"),
            speedup_vs_hf_assisted=e2e.get("speedup_vs_hf_assisted"),
        )
        checks = {key: _check(values[key], GOALS[key], on_gpu) for key in GOALS}
        verdicts = [check["passed"] for check in checks.values()]
        checks["all_passed"] = None if not on_gpu or None in verdicts else all(verdicts)
        per_variant[name] = checks
    verdicts = [checks["all_passed"] for checks in per_variant.values()]
    return dict(
        device_goal="H100",
        drafter=goal_drafter,
        alpha=GOAL_ALPHA,
        note="hidden_fraction, target_slowdown: co-run of the drafter work (prefill + free_token_budget steps); "
        f"free_tokens, system_efficiency and speedups: end to end at alpha {GOAL_ALPHA}, chain gamma 5. "
        + ("" if on_gpu else "CPU smoke test: values are recorded, passed is null (no speed claim)."),
        per_variant=per_variant,
        any_variant_passes_all=None if not on_gpu or not verdicts else any(v is True for v in verdicts),
    )


# ----------------------------------------------------------------------------------------------
# Script mode
# ----------------------------------------------------------------------------------------------


def _parse_variants(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    return names


def parse_args(argv=None):
    parser = harness.e2e_arg_parser(
        OP,
        __doc__.split("\n\n")[0],
        drafters=DRAFTERS_7B,
        defaults=dict(
            preset="tiny: tiny random models (CPU smoke; default without CUDA); 7b: Video-LLaVA-7B-shaped target "
            "and EventGPT-1B/-7B drafters, random bf16 weights on the GPU (default with CUDA)",
            drafters="default: both; --quick: eventgpt-1b",
            max_new_tokens="default: tiny 8, 7b 128; --quick 7b: 64",
            repeats="default: tiny 1, 7b 5; --quick 7b: 3",
            free_token_budget="drafts while the target prefills = k drafter steps of T_d; default: tiny 4, 7b 32",
        ),
    )
    parser.add_argument(
        "--variants",
        type=_parse_variants,
        default=list(VARIANTS),
        help=f"mechanism variants to run (default all: {','.join(VARIANTS)})",
    )
    parser.add_argument(
        "--drafter-sms",
        type=int,
        help="green contexts: the drafter partition's SM count (default: automatic)",
    )
    parser.add_argument("--gamma", type=int, default=5, help="chain length of the end-to-end rounds (5)")
    args = parser.parse_args(argv)
    for name in ("gamma", "drafter_sms"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    args = harness.check_e2e_args(parser, args, DRAFTERS_7B)
    tiny = args.preset == "tiny"
    if args.free_token_budget is None:
        args.free_token_budget = 4 if tiny else 32
    if args.max_new_tokens is None:
        args.max_new_tokens = 8 if tiny else (64 if args.quick else 128)
    if args.repeats is None:
        args.repeats = 1 if tiny else (3 if args.quick else 5)
    return args


TABLE_COLUMNS = (
    ("config", "variant", ""),
    ("T_p", "T_p ms", ".2f"),
    ("T_d", "T_d ms", ".2f"),
    ("M", "M ms", ".2f"),
    ("h", "h", ".2f"),
    ("s", "s", ".2f"),
    ("free", "free", ".0f"),
    ("ttft", "TTFT ms", ".1f"),
    ("tps", "tok/s", ".1f"),
    ("accept", "accept", ".2f"),
    ("x_ar", "x gen", ".2f"),
    ("x_hf", "x HF", ".2f"),
    ("eff", "sys eff", ".2f"),
    ("status", "status", ""),
)


def _table(drafters: dict) -> list[dict]:
    shown = []
    for drafter, variants in drafters.items():
        for name, variant in variants.items():
            if variant.get("status") != "ok":
                shown.append(dict(config=f"{drafter}/{name}", status=variant.get("status")))
                continue
            overlap = variant["overlap"]
            for alpha, row in variant["end_to_end"].items():
                shown.append(
                    dict(
                        config=f"{drafter}/{name}/a{alpha}",
                        T_p=overlap["T_p_ms"],
                        T_d=overlap["T_d_ms"],
                        M=overlap["M_ms"],
                        h=overlap["hidden_fraction"],
                        s=overlap["target_slowdown"],
                        free=row["free_tokens"],
                        ttft=row["ttft_ms"]["median"],
                        tps=row["tokens_per_s"]["median"],
                        accept=row["acceptance_rate"],
                        x_ar=row["speedup_vs_target_generate"],
                        x_hf=row["speedup_vs_hf_assisted"],
                        eff=row["system_efficiency"],
                        status="ok",
                    )
                )
    return shown


def run_variant(name, setup, work, args, device, reference, baselines) -> tuple[list[dict], list[str]]:
    """run_configs callback for one mechanism variant: ([row], problems)."""
    row = dict(config=f"{work.name}/{name}", variant=name, drafter=work.name, backend=name)
    if name not in args.variants:
        row.update(status="skipped", reason="not selected (--variants)")
        return [row], []
    mechanism = make_mechanism(name, work, args, device)
    if mechanism.skipped is not None:
        row.update(status="skipped", reason=mechanism.skipped, error=f"skipped: {mechanism.skipped}")
        return [row], []
    try:
        with mechanism.close:
            if name == "green_contexts+graphs":
                _graphed_drafter(work, device)
            overlap = measure_overlap(work, name, mechanism.streams, work.baseline, args.repeats, device)
            end_to_end, problems = measure_end_to_end(
                setup, work, mechanism, args, device, reference, baselines
            )
    except _Skip as skip:
        row.update(status="skipped", reason=str(skip), error=f"skipped: {skip}")
        return [row], []
    except Exception as error:  # one broken variant must not lose the others' numbers
        message = f"{type(error).__name__}: {error}"
        row.update(status="error", error=message)
        return [row], [f"{row['config']}: {message}"]
    finally:
        work.step_mode = "eager"
    row.update(
        status="ok",
        mechanism=mechanism.details,
        graphed_drafter=name == "green_contexts+graphs",
        overlap=overlap,
        end_to_end=end_to_end,
        median_us=overlap["M_ms"] * 1e3,
    )
    return [row], problems


def main(argv=None) -> int:
    args = parse_args(argv)
    tiny = args.preset == "tiny"
    device, smoke, info = harness.start_run(args)
    torch.manual_seed(SEED)
    drafter_names = args.drafters or (["eventgpt-1b"] if args.quick else list(DRAFTERS_7B))
    setup = setup_for(args.preset, device, drafter_names)
    specs = [spec for spec in setup.drafters if spec.name.startswith("eventgpt")]
    print(f"preset {setup.preset}: {setup.details['target']}", flush=True)

    # The reference: target.generate's greedy tokens, a round longer than the requests.
    reference = run_generate(setup, args, device, args.max_new_tokens + args.gamma + 1)["tokens"].to(device)
    assistant, assistant_what = build_assistant(setup, device)
    baselines, problems = measure_baselines(setup, args, device, assistant, reference)
    del assistant
    harness.free_cuda_memory(device)

    drafters, all_rows = {}, []
    for spec in specs:
        drafter, adapter, drafter_inputs = spec.build()
        work = Work(
            setup.target,
            setup.target_inputs,
            drafter,
            adapter,
            drafter_inputs,
            args.free_token_budget,
            args.backend,
            device,
        )
        work.name = spec.name
        work.target_prefill(StageTimer(device), None)  # warm-up of both before the full-device baselines
        work.drafter_work(StageTimer(device), None)
        work.baseline = dict(
            T_p_ms=harness.median(_run_alone(work, "target", None, device) for _ in range(args.repeats)),
            T_d_ms=harness.median(_run_alone(work, "drafter", None, device) for _ in range(args.repeats)),
        )
        print(f"{spec.name}: T_p {work.baseline['T_p_ms']:.2f} ms, T_d {work.baseline['T_d_ms']:.2f} ms")
        rows, found = harness.run_configs(
            VARIANTS,
            lambda name, work=work: run_variant(name, setup, work, args, device, reference, baselines),
        )
        problems += found
        all_rows += rows
        drafters[spec.name] = {row["variant"]: row for row in rows}
        del drafter, adapter, work
        harness.free_cuda_memory(device)

    print()
    print(harness.format_table(_table(drafters), TABLE_COLUMNS))
    skipped = [row for row in all_rows if row.get("status") == "skipped"]
    for row in skipped:
        print(f"skipped {row['config']}: {row['reason']}")
    if smoke:
        print(harness.SMOKE_BANNER)
    goal_drafter = GOAL_DRAFTER_7B if not tiny else specs[0].name
    payload = harness.results_payload(
        OP,
        smoke,
        info,
        list(VARIANTS),
        [f"{row['config']}: {row['reason']}" for row in skipped],
        all_rows,
        problems,
        preset=setup.preset,
        dtype=str(setup.dtype).replace("torch.", ""),
        models=dict(setup.details, drafters={spec.name: spec.description for spec in specs}),
        hf_assistant=assistant_what,
        request=dict(
            batch=1,
            max_new_tokens=args.max_new_tokens,
            temperature=0.0,
            eos="disabled",
            gamma=args.gamma,
            free_token_budget=args.free_token_budget,
            alphas=list(ALPHAS),
            repeats=args.repeats,
            warmup=args.warmup,
            engine_backend=args.backend,
            reference=f"target.generate greedy, {reference.shape[1]} tokens",
        ),
        clock="CUDA events"
        if device.type == "cuda"
        else "time.perf_counter (CPU SMOKE TEST, no speed claim)",
        definitions=DEFINITIONS,
        analytic_model=ANALYTIC_MODEL,
        baselines=baselines,
        variants=drafters,
        goals=goals_block(drafters, goal_drafter, on_gpu=not smoke),
    )
    return harness.finish_run(OP, args.out, smoke, info, payload, problems)


# ----------------------------------------------------------------------------------------------
# pytest: `pytest bench/bench_overlap.py` (bench/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------


def test_script_smoke(tmp_path) -> None:
    """The tiny preset on CPU: sequential and priority run through the engine, the GPU-only variants are
    skipped with reasons, the JSON carries timelines and goals (null verdicts), and the plots render."""
    assert main(["--preset", "tiny", "--cpu", "--quick", "--out", str(tmp_path)]) == 0
    written = list(tmp_path.glob(f"{OP}-*.json"))
    assert len(written) == 1
    payload = json.loads(written[0].read_text())
    assert payload["smoke_test"] is True and payload["preset"] == "tiny" and not payload["problems"]
    variants = payload["variants"]["eventgpt-tiny"]
    assert set(variants) == set(VARIANTS)
    for name in CUDA_ONLY:
        assert variants[name]["status"] == "skipped" and variants[name]["reason"], name
    for name in ("sequential", "priority"):
        variant = variants[name]
        assert variant["status"] == "ok", variant
        overlap = variant["overlap"]
        assert overlap["T_p_ms"] > 0 and overlap["T_d_ms"] > 0 and overlap["M_ms"] > 0
        assert math.isfinite(overlap["hidden_fraction"]) and overlap["target_slowdown"] > 0
        lanes = overlap["timeline"]["lanes"]
        assert [span["name"] for span in lanes["target"]] == ["target.prefill"]
        steps = [span for span in lanes["drafter"] if span["name"].startswith("draft.step")]
        assert len(steps) == payload["request"]["free_token_budget"]
        for span in lanes["target"] + lanes["drafter"]:
            assert 0.0 <= span["start_ms"] <= span["end_ms"] <= overlap["M_ms"] + 1e-6
        assert set(variant["end_to_end"]) == {str(alpha) for alpha in ALPHAS}
        for row in variant["end_to_end"].values():
            assert row["tokens_identical"] is True and not row["fallback"]
            assert 0.0 <= row["acceptance_rate"] <= 1.0
            assert row["speedup_vs_target_generate"] > 0 and row["speedup_vs_hf_assisted"] > 0
            assert row["system_efficiency"] is not None
    # Sequential: the drafter starts after the target's prefill ends.
    lanes = variants["sequential"]["overlap"]["timeline"]["lanes"]
    assert lanes["drafter"][0]["start_ms"] >= lanes["target"][0]["end_ms"]
    # Controlled acceptance drives the measured acceptance (alpha 0.8 accepts more than 0.2).
    rows = variants["sequential"]["end_to_end"]
    assert rows["0.8"]["acceptance_rate"] > rows["0.2"]["acceptance_rate"]
    hf_rows = payload["baselines"]["hf_assisted"]
    assert all(row["tokens_identical"] for row in hf_rows.values())
    assert hf_rows["0.8"]["acceptance_rate"] > hf_rows["0.2"]["acceptance_rate"]
    goals = payload["goals"]
    assert set(goals["per_variant"]) == {"sequential", "priority"}
    for checks in goals["per_variant"].values():
        assert set(GOALS) <= set(checks) and checks["all_passed"] is None
        assert all(checks[key]["passed"] is None and checks[key]["value"] is not None for key in GOALS)

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import pytest

        pytest.skip("matplotlib is not installed (pip install matplotlib): the plotting part is not tested")
    import plot_overlap

    out = tmp_path / "plots"
    assert plot_overlap.main([str(written[0]), "--out", str(out)]) == 0
    pngs = {path.name for path in out.glob("*.png")}
    assert {"timeline-sequential.png", "timeline-priority.png", "speedup_vs_alpha.png"} <= pngs


if __name__ == "__main__":
    sys.exit(main())
