"""Backend choice shared by every op: one place that knows what can run where."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("cuda", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    # Triton reads this when a kernel is decorated, so it must be set before our kernels import.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_backend(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``backend`` for tensors on ``device``; raise with the reason when it cannot run.

    Default: CUDA tensors use the CUDA extension when built, else Triton; CPU tensors use the
    reference, or Triton when TRITON_INTERPRET=1 (that is how CPU tests exercise Triton kernels).
    """
    if backend is None:
        if device.type == "cuda":
            from crossspec_kernels import _ext

            if _ext.is_available():
                return "cuda"
            return "triton" if triton_available() else "reference"
        if device.type == "cpu" and triton_interpreting() and triton_available() and dtype != torch.bfloat16:
            return "triton"
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
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
