"""The ``crossspec`` command.

crossspec demo       the engine end to end on tiny random models (crossspec_kernels.demo)
crossspec generate   answer a question about a video + event recording with real checkpoints
crossspec info       versions, whether the CUDA extension is built, devices, backend choice
crossspec adapter extract|train|eval   the adapter toolchain (crossspec_kernels.adapter_tools)

Building the parser imports no torch, transformers or model code (each command imports what it needs
when it runs), so ``--help`` answers at once. Exit codes: see ``cli_common.EXIT_CODES_HELP``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import traceback

from crossspec_kernels.cli_common import EXIT_CODES_HELP, EXIT_OK, EXIT_RUNTIME, HelpFormatter, add_command


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def run_info(args: argparse.Namespace) -> int:
    import torch

    import crossspec_kernels
    from crossspec_kernels import _ext
    from crossspec_kernels.ops._dispatch import pick_backend

    rows: list[tuple[str, str]] = [
        (
            "crossspec_kernels",
            f"{crossspec_kernels.__version__} ({os.path.dirname(crossspec_kernels.__file__)})",
        ),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"),
        ("triton", _version("triton")),
        ("numpy", _version("numpy")),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
    ]
    if _ext.is_available():
        ext = _ext.get_module()
        version = ext.cuda_version()
        rows += [
            ("_C extension", f"built ({ext.__file__})"),
            ("_C CUDA archs", ext.cuda_archs()),
            ("_C CUDA runtime", f"{version // 1000}.{version % 1000 // 10} (static cudart)"),
            ("_C device count", str(ext.device_count())),
        ]
    else:
        reason = "unknown"
        try:
            _ext.get_module()
        except RuntimeError as error:
            reason = str(error)
        rows.append(("_C extension", f"not built: {reason}"))

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    rows.append(("CUDA devices (torch)", ", ".join(devices) if devices else "none"))

    for device, note in (
        (torch.device("cpu"), ""),
        (torch.device("cuda"), "" if cuda else " (no device here)"),
    ):
        try:
            choice = pick_backend("verify", None, device, torch.float32)
        except (RuntimeError, ValueError) as error:
            choice = f"none ({error})"
        rows.append((f"verify on {device.type} tensors", choice + note))

    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # The commands' modules keep torch and transformers imports inside their functions.
    from crossspec_kernels.adapter_tools.cli import add_adapter_parser
    from crossspec_kernels.benchmark.cli import add_bench_parser
    from crossspec_kernels.datasets.cli import add_data_parser
    from crossspec_kernels.demo import add_demo_parser
    from crossspec_kernels.generate_cli import add_generate_parser
    from crossspec_kernels.serving.cli import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="crossspec",
        description="Cross-modal speculative decoding kernels for video LLMs.",
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(sub)
    add_generate_parser(sub)
    info = add_command(sub, "info", help="versions, extension build, devices and backend choice")
    info.set_defaults(func=run_info)
    add_adapter_parser(sub)
    add_data_parser(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run, map the outcome to an exit code (usage errors raise SystemExit(2) themselves)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `crossspec demo | head`: stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception:  # not a usage error (those are SystemExit): keep the traceback, exit 3, not 1
        traceback.print_exc()
        print(f"crossspec {args.command}: runtime error (exit status {EXIT_RUNTIME})", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    raise SystemExit(main())
