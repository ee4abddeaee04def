"""Public ops: validation with named errors, then dispatch to cuda / triton / reference."""

from crossspec_kernels.ops.verify import verify

__all__ = ["verify"]
