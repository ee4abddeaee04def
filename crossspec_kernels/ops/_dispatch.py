"""Backend choice shared by every op: one place that knows what can run where."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("cuda", "triton", "torch", "reference")
# Every op has these; "torch" (vectorised, sync-free PyTorch: crossspec_kernels/torch_ops/) only
# where an op names it in ``supported``.
DEFAULT_SUPPORTED = ("cuda", "triton", "reference")


# Looked up once (a path search, triton itself is not imported): a plain global is also what
# torch.compile reads best while tracing an op's dispatch.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreting() -> bool:
    # Triton reads this when a kernel is decorated, so it must be set before our kernels import.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_backend(
    op: str,
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    supported: tuple[str, ...] = DEFAULT_SUPPORTED,
) -> str:
    """Resolve ``backend`` for tensors on ``device``; raise with the reason when it cannot run.

    Default: CUDA tensors use the CUDA extension when built, else Triton; CPU tensors use Triton
    when TRITON_INTERPRET=1 (that is how CPU tests exercise Triton kernels) and the dtype is not
    bf16, else the ``torch`` backend where the op has one (``supported``), else the reference.
    """
    fallback = "torch" if "torch" in supported else "reference"
    if backend is None:
        if device.type == "cuda":
            from crossspec_kernels import _ext

            if _ext.is_available():
                return "cuda"
            return "triton" if triton_available() else fallback
        if device.type == "cpu" and triton_interpreting() and triton_available() and dtype != torch.bfloat16:
            return "triton"
        return fallback
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {supported} or None, got {backend!r}")
    if backend not in supported:
        raise ValueError(f"{op}: there is no {backend!r} backend for this op; use one of {supported} or None")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        from crossspec_kernels import _ext

        _ext.get_module()  # raises with build instructions when the extension is missing
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton==3.6.0)")
        if device.type == "cpu":
            if not triton_interpreting():
                raise ValueError(
                    f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing "
                    "crossspec_kernels (Triton's CPU interpreter)"
                )
            if dtype == torch.bfloat16:
                raise ValueError(
                    f"{op}: the Triton CPU interpreter mishandles bf16; use fp32/fp16 or another backend"
                )
        elif device.type != "cuda":
            raise ValueError(f"{op}: backend='triton' needs CUDA or CPU tensors, got tensors on {device}")
    return backend
