"""Fused LM head + log-softmax + top-k: validation and backend dispatch.

Backends: ``triton`` (crossspec_kernels/triton/lm_head_topk.py) and ``reference``
(crossspec_kernels/reference.py, the spec). There is no ``cuda`` (C++) backend for this op.

``crossspec::lm_head_topk`` is the op as a ``torch.library`` custom op with a fake implementation:
eager calls run the backend directly, torch.compile goes through the custom op.
"""

from __future__ import annotations

import math

import torch

from crossspec_kernels import reference
from crossspec_kernels.ops._dispatch import pick_backend, triton_available, triton_interpreting

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 16
TRITON_MAX_ROWS = 64


def lm_head_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    return_probs: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k of log softmax(hidden @ weight.T / temperature) without materialising the logits.

    Args:
        hidden: [M, d] fp16/bf16/fp32, the (adapted) drafter hidden states; M in [1, 64] for the
            triton backend (the reference takes any M >= 1).
        weight: [V, d] fp16/bf16/fp32, the target's LM head, on hidden's device. Its dtype may
            differ from hidden's: the triton backend casts hidden (M x d, cheap) to the weight's
            dtype, so the multiply runs in W's precision with fp32 accumulation.
        k: number of candidates, 1 <= k <= min(16, V).
        temperature: finite float > 0 dividing the logits.
        return_probs: also return the full softmax [M, V] fp32 (``verify``'s draft_probs).
        backend: "triton" or "reference"; None = triton for CUDA tensors, on CPU the reference, or
            triton under TRITON_INTERPRET=1 (not bf16). There is no "cuda" backend for this op.

    Returns:
        (logprobs [M, k] fp32 sorted descending, ids [M, k] int64, probs [M, V] fp32 or None);
        equal log-probs keep the lower id first.
    """
    _check_inputs(hidden, weight)
    num_rows, _ = hidden.shape
    vocab = weight.shape[0]
    k = _check_k(k, vocab)
    temperature = _check_temperature(temperature)
    if not isinstance(return_probs, bool):
        raise TypeError(f"lm_head_topk: return_probs must be a bool, got {type(return_probs).__name__}")

    backend = _pick_backend(backend, hidden.device, hidden.dtype, weight.dtype, num_rows)
    if torch.compiler.is_compiling():
        logprobs, ids, probs = torch.ops.crossspec.lm_head_topk(
            hidden, weight, k, temperature, return_probs, backend
        )
        return logprobs, ids, probs if return_probs else None
    return _run_backend(hidden, weight, k, temperature, return_probs, backend)


def _run_backend(hidden, weight, k: int, temperature: float, return_probs: bool, backend: str):
    if backend == "reference":
        return reference.lm_head_topk(hidden, weight, k, temperature=temperature, return_probs=return_probs)
    from crossspec_kernels.triton.lm_head_topk import lm_head_topk as triton_lm_head_topk

    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return triton_lm_head_topk(hidden, weight, k, temperature, return_probs)


# A custom op cannot return None: without return_probs, probs is an empty [0] tensor here.
@torch.library.custom_op("crossspec::lm_head_topk", mutates_args=())
def _lm_head_topk_op(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, return_probs: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """crossspec::lm_head_topk: the op on checked inputs (torch.compile calls it)."""
    logprobs, ids, probs = _run_backend(hidden, weight, k, temperature, return_probs, backend)
    return logprobs, ids, hidden.new_empty(0, dtype=torch.float32) if probs is None else probs


@_lm_head_topk_op.register_fake
def _(hidden, weight, k, temperature, return_probs, backend):
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    new = hidden.new_empty
    probs = new((num_rows, vocab) if return_probs else (0,), dtype=torch.float32)
    return new((num_rows, k), dtype=torch.float32), new((num_rows, k), dtype=torch.int64), probs


def _pick_backend(
    backend: str | None,
    device: torch.device,
    hidden_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    num_rows: int,
) -> str:
    if backend == "cuda":
        raise ValueError(
            "lm_head_topk: there is no 'cuda' (C++) backend for this op; use backend='triton', "
            "'reference' or None"
        )
    if backend is not None and backend not in ("triton", "reference"):
        raise ValueError(f"lm_head_topk: backend must be 'triton', 'reference' or None, got {backend!r}")
    any_bf16 = torch.bfloat16 in (hidden_dtype, weight_dtype)
    if backend is None:
        if not triton_available() or num_rows > TRITON_MAX_ROWS:
            return "reference"
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and triton_interpreting() and not any_bf16:
            return "triton"
        return "reference"
    backend = pick_backend("lm_head_topk", backend, device, torch.bfloat16 if any_bf16 else weight_dtype)
    if backend == "triton" and num_rows > TRITON_MAX_ROWS:
        raise ValueError(
            f"lm_head_topk: backend='triton' takes M in [1, {TRITON_MAX_ROWS}] rows, got M = {num_rows} "
            "(the reference takes any)"
        )
    return backend


def _check_inputs(hidden, weight) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"lm_head_topk: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"lm_head_topk: hidden must be 2-D [M, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"lm_head_topk: weight must be 2-D [V, d], got shape {tuple(weight.shape)}")
    num_rows, hidden_dim = hidden.shape
    vocab, weight_dim = weight.shape
    if num_rows < 1:
        raise ValueError(f"lm_head_topk: hidden must have M >= 1 rows, got {num_rows}")
    if hidden_dim < 1:
        raise ValueError(f"lm_head_topk: hidden size d must be >= 1, got {hidden_dim}")
    if weight_dim != hidden_dim:
        raise ValueError(
            f"lm_head_topk: weight has hidden size {weight_dim} but hidden has {hidden_dim} "
            f"(weight must be [V, d] = [V, {hidden_dim}])"
        )
    if vocab < 1:
        raise ValueError(f"lm_head_topk: weight must have V >= 1 rows, got {vocab}")
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"lm_head_topk: {name} must be fp16, bf16 or fp32, got {tensor.dtype}")
    if hidden.device != weight.device:
        raise ValueError(
            f"lm_head_topk: hidden and weight must be on one device, got {hidden.device} and {weight.device}"
        )
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if tensor.stride(-1) != 1:
            raise ValueError(
                f"lm_head_topk: {name} must have a unit-stride last dim, got strides {tuple(tensor.stride())}"
            )


def _check_k(k, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"lm_head_topk: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"lm_head_topk: k must be in [1, {MAX_K}], got {k}")
    if k > vocab:
        raise ValueError(f"lm_head_topk: k = {k} exceeds the vocabulary size V = {vocab}")
    return k


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"lm_head_topk: temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"lm_head_topk: temperature must be finite and > 0, got {temperature}")
    return float(temperature)
