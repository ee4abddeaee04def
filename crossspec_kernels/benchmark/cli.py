"""``crossspec bench e2e``: the parser and the runner's checks (see ``benchmark.e2e`` for the run).

The parser imports nothing heavy (``--help`` stays fast). Every flag, the manifest's every line and
the files it names are checked before a model is built; errors name the flag, or the line and field.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

from crossspec_kernels.cli_common import (
    EXIT_OK,
    EXIT_OUTPUTS_DIFFER,
    UsageError,
    add_command,
    existing_file,
    int_at_least,
    output_file,
)

PROG = "crossspec bench e2e"
BACKEND_CHOICES = ("auto", "cuda", "triton", "reference")
EVENT_LAYOUTS = ("original", "per-frame")
MAX_FREE_TOKEN_BUDGET = 127  # runtime.draft_config.MAX_DRAFT_NODES, spelled out: that module imports torch
# The ops the engine runs, each of which must accept a forced --backend on the chosen device.
_ENGINE_OPS = ("verify", "tree_attention", "lm_head_topk")


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"every length must be >= 1, got {text!r}")
    return sorted(set(lengths))


def add_e2e_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest", required=True, metavar="FILE", help="JSONL: one sample per line (crossspec data synth)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=parse_lengths,
        default=[5, 20, 50, 100],
        metavar="N[,N...]",
        help="answer lengths to sweep",
    )
    parser.add_argument("--limit", type=int_at_least(1), metavar="N", help="only the first N samples")
    parser.add_argument(
        "--adapter",
        action="append",
        metavar="DIR",
        help="an adapter or feature head folder (save_pretrained) to run the engine with; repeat for a "
        "research-style table with one row each; 'identity' = no adapter (the default)",
    )
    parser.add_argument("--gamma", type=int_at_least(1), default=5, help="chain draft length per round")
    parser.add_argument(
        "--free-token-budget",
        type=int_at_least(1),
        default=32,
        help=f"most tokens drafted during the target's prefill (engine default; at most {MAX_FREE_TOKEN_BUDGET})",
    )
    parser.add_argument(
        "--event-layout",
        choices=EVENT_LAYOUTS,
        default="original",
        help="drafter event tokens: original EventGPT (N + P) or per-frame (N*P + N + P)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    parser.add_argument(
        "--backend", choices=BACKEND_CHOICES, default="auto", help="force the kernels' backend (auto: per op)"
    )
    parser.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random models")
    parser.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed runs on the first sample")
    parser.add_argument("--json", metavar="PATH", help="write every sample, the aggregates and settings here")
    parser.add_argument("--plot", metavar="DIR", help="write 4 PNG plots into DIR (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_bench_parser(sub) -> None:
    bench = add_command(sub, "bench", help="benchmarks (e2e: manifest-driven, per sample)")
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    e2e = add_command(
        commands,
        "e2e",
        help="engine vs target.generate on every sample of a manifest, answer-length sweep",
        description="For every sample of a manifest and every answer length: target.generate, then\n"
        "CrossSpecEngine on the same inputs (tokens must match), timings, acceptance, memory.\n"
        "Models: the tiny random target and drafter of `crossspec demo`; CPU numbers are smoke tests.",
    )
    add_e2e_arguments(e2e)
    e2e.set_defaults(func=run_e2e)


def _check(args: argparse.Namespace):
    """(samples, device, backend) once every flag and the manifest are known to be usable."""
    from crossspec_kernels.datasets import ManifestError, load_manifest

    existing_file(args.manifest, "--manifest")
    if args.free_token_budget > MAX_FREE_TOKEN_BUDGET:
        raise UsageError(
            f"--free-token-budget must be <= {MAX_FREE_TOKEN_BUDGET}, got {args.free_token_budget}"
        )
    if args.json:
        output_file(args.json, "--json")
    if args.plot:
        if Path(args.plot).is_file():
            raise UsageError(f"--plot {args.plot!r} is a file; give a folder")
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib, which is not installed: pip install matplotlib")
    try:
        samples = load_manifest(args.manifest)
    except ManifestError as error:
        raise UsageError(f"--manifest: {error}") from None
    samples = samples[: args.limit]
    _check_adapters(args.adapter or ["identity"])

    import torch

    from crossspec_kernels.generate_cli import resolve_device
    from crossspec_kernels.ops._dispatch import pick_backend

    device = resolve_device(args.device)
    backend = None if args.backend == "auto" else args.backend
    for op in _ENGINE_OPS:
        try:
            pick_backend(op, backend, device, torch.float32)
        except (RuntimeError, ValueError) as error:
            raise UsageError(f"--backend {args.backend} cannot run on {device} here: {error}") from None
    return samples, device, backend


def _check_adapters(specs: list[str]) -> None:
    """Every --adapter folder holds a readable adapter config (the weights are checked at load)."""
    from crossspec_kernels.models.adapters import CONFIG_NAME, AdapterConfig

    if len(set(specs)) != len(specs):
        raise UsageError(f"--adapter: a folder is given twice in {specs}")
    for spec in specs:
        if spec == "identity":
            continue
        config = Path(spec) / CONFIG_NAME
        if not config.is_file():
            raise UsageError(
                f"--adapter {spec}: no {CONFIG_NAME} there (a folder written by save_pretrained)"
            )
        try:
            AdapterConfig.from_dict(json.loads(config.read_text()))
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            raise UsageError(f"--adapter {spec}: {config} is not a valid adapter config: {error}") from None


def _finite(value):
    """JSON has no inf/nan: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def run_e2e(args: argparse.Namespace) -> int:
    try:
        samples, device, backend = _check(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise
    import torch

    from crossspec_kernels.benchmark.e2e import run_benchmark
    from crossspec_kernels.benchmark.summary import format_research_table, format_table

    if args.threads:
        torch.set_num_threads(args.threads)

    settings = {
        "gamma": args.gamma,
        "free_token_budget": args.free_token_budget,
        "event_layout": args.event_layout,
        "backend": backend,
        "seed": args.seed,
        "warmup": args.warmup,
        "manifest": str(Path(args.manifest).resolve()),
        "adapters": args.adapter or ["identity"],
    }
    try:
        result = run_benchmark(samples, args.max_new_tokens, settings, device, show_progress=not args.quiet)
    except ValueError as error:
        if not str(error).startswith("--adapter"):
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise UsageError(str(error)) from None
    result = _finite(result)
    environment, used = result["environment"], result["settings"]
    print(
        f"{PROG}: {len(samples)} samples x max_new_tokens {used['max_new_tokens']}; {used['models']}; "
        f"{environment['device']} ({environment['device_name']}), {environment['torch_threads']} threads, "
        f"torch {environment['torch']}, transformers {environment['transformers']}"
    )
    print(
        f"engine: {used['draft']}, draftings {', '.join(used['draftings'])}, free_token_budget {used['free_token_budget']}, "
        f"event token layout {used['event_token_layout']}, backend {args.backend}; "
        f"end of sequence {used['end_of_sequence']}; peak memory = {used['peak_memory']}"
    )
    assisted = result["assisted"]
    print(
        "HF assisted generation: "
        + ("measured" if assisted["available"] else f"not run: {assisted['reason']}")
    )
    for length in used["max_new_tokens"]:
        print()
        print(format_research_table(length, result["aggregates"]))
    for name, by_length in result["aggregates"].items():
        for length, summary in by_length.items():
            print(f"\n[{name}]")
            print(format_table(int(length), summary))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        from crossspec_kernels.benchmark.plots import write_plots

        for path in write_plots(result, args.plot):
            print(f"wrote {path}")
    if not result["identical_all"]:
        mismatched = sum(not record["identical"] for record in result["samples"])
        print(
            f"\n{PROG}: MISMATCH: the engine's tokens differ from target.generate's on {mismatched} of "
            f"{len(result['samples'])} runs (exit status {EXIT_OUTPUTS_DIFFER})",
            file=sys.stderr,
        )
        return EXIT_OUTPUTS_DIFFER
    return EXIT_OK
