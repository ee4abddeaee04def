"""Adapter projection + target LM head top-k: drafter hidden -> adapter -> lm_head_topk.

``BottleneckAdapter`` runs as one extra fused Triton launch (crossspec_kernels/triton/
bottleneck_adapter.py) on the triton backend, and as the module itself on the reference backend;
other adapters (``LinearAdapter``, ``EagleAdapter``) run their module forward, and ``None`` is the
identity. The adapted [M, d_target] states then go to ``lm_head_topk`` with the same backend.

Why one extra launch and not a prologue of lm_head_topk: at M <= 64 rows the adapter is tiny next
to streaming the V x d LM head, and fusing it into lm_head_topk's ~250 vocab-split programs would
make each of them recompute it.

Inference only: the fused path does not track gradients. Under torch.compile the fused kernel is
the ``crossspec::bottleneck_adapter`` custom op and the LM head is ``crossspec::lm_head_topk``.
"""

from __future__ import annotations

import torch

from crossspec_kernels.models.adapters import BottleneckAdapter, EagleAdapter, LinearAdapter
from crossspec_kernels.ops._dispatch import pick_backend, triton_available, triton_interpreting
from crossspec_kernels.ops.lm_head_topk import _check_k, _check_temperature, lm_head_topk

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_ROWS = 64
TRITON_MAX_RANK = 1024
_OP = "adapter_lm_head_topk"


def adapter_lm_head_topk(
    hidden: torch.Tensor,
    adapter: torch.nn.Module | None,
    lm_head_weight: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    return_probs: bool = False,
    backend: str | None = None,
    prev_tokens: torch.Tensor | None = None,
    target_hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k of log softmax(adapter(hidden) @ lm_head_weight.T / temperature).

    Args:
        hidden: [M, d_draft] fp16/bf16/fp32 drafter hidden states (d_draft = adapter.config.d_draft;
            with ``adapter=None`` it must already be [M, d_target]). M in [1, 64] for the triton
            backend.
        adapter: BottleneckAdapter (fused kernel on triton), LinearAdapter, EagleAdapter (module
            forward; ``prev_tokens``/``target_hidden`` are passed to it, and its 2-D input is one
            sequence of M positions) or None (identity). Its parameters must be on hidden's device
            and, for the bottleneck, of hidden's dtype.
        lm_head_weight: [V, d_target] the target's LM head, on hidden's device.
        k, temperature, return_probs: as ``lm_head_topk``.
        backend: "triton" or "reference" for both the adapter and the LM head; None = triton for
            CUDA tensors (M <= 64), on CPU the reference, or triton under TRITON_INTERPRET=1 (not
            bf16). There is no "cuda" backend.

    Returns:
        (logprobs [M, k] fp32, ids [M, k] int64, probs [M, V] fp32 or None), as ``lm_head_topk``.
    """
    d_in, d_out = _check_adapter(adapter, hidden, lm_head_weight)
    _check_tensors(hidden, lm_head_weight, d_in, d_out)
    num_rows = hidden.shape[0]
    k = _check_k(k, lm_head_weight.shape[0])
    temperature = _check_temperature(temperature)
    if not isinstance(return_probs, bool):
        raise TypeError(f"{_OP}: return_probs must be a bool, got {type(return_probs).__name__}")
    _check_params(adapter, hidden)
    backend = _resolve_backend(backend, hidden, lm_head_weight, adapter)

    if adapter is None:
        adapted = hidden
    elif isinstance(adapter, BottleneckAdapter) and backend == "triton":
        params = {name: None if t is None else t.detach() for name, t in adapter.fused_params().items()}
        fused = torch.ops.crossspec.bottleneck_adapter if torch.compiler.is_compiling() else _fused_bottleneck
        adapted = fused(hidden.detach(), **params, eps=adapter.eps)
    else:
        with torch.no_grad():
            adapted = adapter(hidden, prev_tokens=prev_tokens, target_hidden=target_hidden)
        if tuple(adapted.shape) != (num_rows, d_out):
            raise ValueError(
                f"{_OP}: the adapter returned shape {tuple(adapted.shape)}, expected [M, d_target] = "
                f"{(num_rows, d_out)}"
            )
    if adapted.stride(-1) != 1:
        adapted = adapted.contiguous()
    return lm_head_topk(
        adapted, lm_head_weight, k, temperature=temperature, return_probs=return_probs, backend=backend
    )


def _fused_bottleneck(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    proj_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The Triton bottleneck kernel on checked inputs: [M, d_target]."""
    from crossspec_kernels.triton.bottleneck_adapter import bottleneck_adapter

    return bottleneck_adapter(
        x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, proj_weight, eps
    )


# The fused kernel as a custom op, so torch.compile can pass through the triton path (the module
# forward of the reference path and the other adapters is traced as it is; lm_head_topk has its own).
_bottleneck_adapter_op = torch.library.custom_op("crossspec::bottleneck_adapter", mutates_args=())(
    _fused_bottleneck
)


@_bottleneck_adapter_op.register_fake
def _(x, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, proj_weight, eps):
    return x.new_empty((x.shape[0], up_weight.shape[0]))


def _check_adapter(adapter, hidden, weight) -> tuple[int, int]:
    """(d_in, d_out) the adapter maps between."""
    if adapter is None:
        d = hidden.shape[-1] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 else -1
        return d, d
    if not isinstance(adapter, (BottleneckAdapter, LinearAdapter, EagleAdapter)):
        raise ValueError(
            f"{_OP}: adapter must be a BottleneckAdapter, LinearAdapter, EagleAdapter or None, "
            f"got {type(adapter).__name__}"
        )
    return adapter.config.d_draft, adapter.config.d_target


def _check_tensors(hidden, weight, d_in: int, d_out: int) -> None:
    for name, tensor in (("hidden", hidden), ("lm_head_weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() != 2 or hidden.shape[0] < 1:
        raise ValueError(f"{_OP}: hidden must be 2-D [M >= 1, d_draft], got shape {tuple(hidden.shape)}")
    if hidden.shape[1] != d_in:
        raise ValueError(
            f"{_OP}: hidden has size {hidden.shape[1]} but the adapter's d_draft is {d_in} "
            f"(hidden must be [M, {d_in}])"
        )
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{_OP}: lm_head_weight must be 2-D [V >= 1, d_target], got {tuple(weight.shape)}")
    if weight.shape[1] != d_out:
        raise ValueError(
            f"{_OP}: lm_head_weight has hidden size {weight.shape[1]} but the adapter's d_target is "
            f"{d_out} (lm_head_weight must be [V, {d_out}])"
        )
    for name, tensor in (("hidden", hidden), ("lm_head_weight", weight)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{_OP}: {name} must be fp16, bf16 or fp32, got {tensor.dtype}")
    if hidden.device != weight.device:
        raise ValueError(
            f"{_OP}: hidden and lm_head_weight must be on one device, got {hidden.device} and {weight.device}"
        )
    if hidden.stride(-1) != 1:
        raise ValueError(
            f"{_OP}: hidden must have a unit-stride last dim, got strides {tuple(hidden.stride())}"
        )


def _check_params(adapter, hidden) -> None:
    if adapter is None:
        return
    for name, param in adapter.named_parameters():
        if param.device != hidden.device:
            raise ValueError(
                f"{_OP}: adapter parameter {name!r} is on {param.device} but hidden is on {hidden.device}"
            )
        if isinstance(adapter, BottleneckAdapter) and param.dtype != hidden.dtype:
            raise ValueError(
                f"{_OP}: BottleneckAdapter parameter {name!r} is {param.dtype} but hidden is {hidden.dtype} "
                "(cast one to the other)"
            )


def _resolve_backend(backend, hidden, weight, adapter) -> str:
    num_rows = hidden.shape[0]
    device = hidden.device
    any_bf16 = torch.bfloat16 in (hidden.dtype, weight.dtype)
    fused = isinstance(adapter, BottleneckAdapter)
    rank_ok = not fused or adapter.config.rank <= TRITON_MAX_RANK
    if backend == "cuda":
        raise ValueError(
            f"{_OP}: there is no 'cuda' (C++) backend for this op; use 'triton', 'reference' or None"
        )
    if backend is not None and backend not in ("triton", "reference"):
        raise ValueError(f"{_OP}: backend must be 'triton', 'reference' or None, got {backend!r}")
    if backend is None:
        if not triton_available() or num_rows > TRITON_MAX_ROWS or not rank_ok:
            return "reference"
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and triton_interpreting() and not any_bf16:
            return "triton"
        return "reference"
    backend = pick_backend(_OP, backend, device, torch.bfloat16 if any_bf16 else weight.dtype)
    if backend == "triton" and num_rows > TRITON_MAX_ROWS:
        raise ValueError(
            f"{_OP}: backend='triton' (fused adapter + lm_head_topk) takes M in [1, {TRITON_MAX_ROWS}] "
            f"rows, got M = {num_rows} (the reference takes any)"
        )
    if backend == "triton" and not rank_ok:
        raise ValueError(
            f"{_OP}: the fused bottleneck kernel takes rank <= {TRITON_MAX_RANK}, got "
            f"{adapter.config.rank} (use backend='reference')"
        )
    return backend
