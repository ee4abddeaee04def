"""The ``crossspec`` command.

crossspec demo       the engine end to end on tiny random models (crossspec_kernels.demo)
crossspec generate   answer a question about a video + event recording with real checkpoints
crossspec info       versions, whether the CUDA extension is built, devices, backend choice
crossspec adapter extract|train|eval   the adapter toolchain (crossspec_kernels.adapter_tools)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def _pick_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    from crossspec_kernels.ops._dispatch import pick_backend

    return pick_backend("verify", backend, device, dtype)


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def run_info(args: argparse.Namespace) -> int:
    import crossspec_kernels
    from crossspec_kernels import _ext

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
            choice = _pick_backend(None, device, torch.float32)
        except (RuntimeError, ValueError) as error:
            choice = f"none ({error})"
        rows.append((f"verify on {device.type} tensors", choice + note))

    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossspec", description="Cross-modal speculative decoding kernels for video LLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from crossspec_kernels.demo import add_demo_parser
    from crossspec_kernels.generate_cli import add_generate_parser

    add_demo_parser(sub)
    add_generate_parser(sub)

    info = sub.add_parser("info", help="versions, extension build, devices and backend choice")
    info.set_defaults(func=run_info)

    from crossspec_kernels.adapter_tools.cli import add_adapter_parser

    add_adapter_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from crossspec_kernels.demo import check_demo_args

        check_demo_args(args)
    try:
        if args.command == "adapter":
            from crossspec_kernels.adapter_tools.cli import run_adapter

            return run_adapter(args)
        return args.func(args)
    except BrokenPipeError:  # e.g. `crossspec demo | head`: stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
