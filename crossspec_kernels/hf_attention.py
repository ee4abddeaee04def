"""The "crossspec" attention implementation for Hugging Face models (below the runtime).

``crossspec_kernels.hf`` re-exports everything here (and ``custom_generate``, a face above the
runtime); import from there. Usage::

    from crossspec_kernels import hf

    hf.register()                                              # idempotent
    model.set_attn_implementation({"text_config": "crossspec"})  # a VLM: only its language model
    model.set_attn_implementation("crossspec")                   # a plain causal LM
    # (hf.enable(model) does register() plus the right one of those two calls)

    out = model(input_ids=tree_tokens,                 # [B, Q]: the tree nodes, root first
                attention_mask=padding_mask,           # [B, past + Q] 2-D, 1 = real token (optional)
                position_ids=prefix_len + depth,       # [B, Q]: RoPE position of each node
                past_key_values=cache,                 # the committed prefix (a DynamicCache)
                crossspec_tree_mask=tree_mask)         # [Q, Q] or [B, Q, Q] bool: i may attend j

Works with transformers 4.57.6 and 5.x (tested on 5.17). How HF drives it, in both versions:

* ``AttentionInterface.register(name, fn)`` puts ``fn`` into a class-level mapping; every attention
  module calls ``fn(module, query [B, Hq, Q, D], key [B, Hkv, L, D], value, attention_mask,
  dropout=..., scaling=..., **kwargs)`` with key/value already holding the cache plus the Q new tokens,
  and expects ``(output [B, Q, Hq, D], weights or None)``. Unknown forward kwargs reach ``**kwargs``
  (the ``TransformersKwargs`` pass-through of Llama and Video-LLaVA), which is how the tree mask
  travels.
* The model builds its mask once per forward (``masking_utils.create_causal_mask``); for a name
  missing from ``AttentionMaskInterface`` it returns None, i.e. padding is silently dropped. Our mask
  function decides what every layer then receives as ``attention_mask``:

  - ``None``: no padding. Causal over the new tokens, the whole prefix visible.
  - ``[B, L]`` bool, *left padding only* (rows look like 0..01..1, the new tokens all real): the
    attention derives ``kv_start[b]`` = number of hidden positions, the kernel's padding argument.
  - ``[B, 1, Q, L]`` bool, anything else: a dense mask (static caches, sliding windows, packed
    sequences, padding holes, padding inside the new tokens e.g. a left-padded prefill, custom
    ``or/and_mask_function``); attention then runs through torch SDPA with it.

  Telling the left-padding form apart needs one host sync per forward (the same as HF's own sdpa mask
  does); under torch.compile / CUDA-graph capture the check is skipped and a 2-D mask is trusted to be
  left padding. To stay sync-free, pass ``attention_mask=None`` and ``crossspec_kv_start=[B] tensor``.

The tree mask may also be set with the :func:`tree_mask` context manager, for callers (or model
classes) that do not forward extra keyword arguments; the keyword wins when both are given.

Queries beyond the kernel's limit (long prefills, Q > 128) go to torch SDPA with the equivalent mask.
Position ids are the caller's: neither this module nor the HF path (the mask depends on cache length,
not positions) changes them. One trap: with neither a cache nor a 2-D attention mask, HF reads
non-consecutive position ids (a tree's ``prefix + depth``) as packed sequences and masks across them;
pass ``attention_mask`` (all ones) or a cache for tree forwards.

Plan once, run many. Everything above is worked out per layer from the layer's arguments. A caller
that knows the forward's masks up front (the engine) builds an :class:`AttentionPlan` once and
passes it as ``crossspec_plan=``; every layer then runs it with no checks, no mask packing and no
mask conversion (FlashInfer's plan()/run()). A plan holds only tensors and Python constants, so
``torch.compile(fullgraph=True)`` and CUDA-graph capture go through it. The :func:`tree_mask` and
:func:`attention_backend` context managers are for eager callers: under ``torch.compile`` they are
not read (Dynamo cannot trace a ``ContextVar``); pass ``crossspec_tree_mask=`` or a plan there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from crossspec_kernels.ops.tree_attention import tree_attention as _tree_attention_op
from crossspec_kernels.reference import tree_visibility

__all__ = [
    "ATTENTION_NAME",
    "AttentionPlan",
    "attention_backend",
    "MAX_KERNEL_QUERIES",
    "crossspec_attention_forward",
    "crossspec_mask",
    "enable",
    "register",
    "run_plan",
    "tree_mask",
]

ATTENTION_NAME = "crossspec"
# The kernel takes at most this many new tokens (a verification tree); more go to torch SDPA.
MAX_KERNEL_QUERIES = 128

logger = logging.getLogger(__name__)

_tree_mask_context: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "crossspec_tree_mask", default=None
)
_backend_context: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "crossspec_attention_backend", default=None
)
_settings = {"backend": None}


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def register(backend: str | None = None) -> None:
    """Register "crossspec" with transformers' AttentionInterface and AttentionMaskInterface.

    Idempotent. ``backend`` is handed to the attention op (e.g. "reference" or "triton"); None lets
    the op choose from the device.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:  # transformers < 4.53 has no AttentionMaskInterface
        raise ImportError(
            "crossspec_kernels.hf needs transformers >= 4.57 (AttentionInterface and "
            f"AttentionMaskInterface); import failed: {error}"
        ) from error
    _settings["backend"] = backend
    AttentionInterface.register(ATTENTION_NAME, crossspec_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, crossspec_mask)


def enable(model, backend: str | None = None):
    """register(), then route ``model``'s language model through "crossspec"; returns ``model``.

    A model with a ``text_config`` (Video-LLaVA, LLaVA, ...) switches only its text model; the vision
    towers keep their implementation. Any other model switches as a whole.
    """
    register(backend)
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": ATTENTION_NAME})
    else:
        model.set_attn_implementation(ATTENTION_NAME)
    return model


@contextlib.contextmanager
def tree_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, crossspec attention uses ``mask`` ([Q, Q] or [B, Q, Q] bool) as tree mask.

    For callers that cannot pass ``crossspec_tree_mask=`` through a model's forward. Context-local
    (contextvars), so threads and asyncio tasks do not see each other's masks.
    """
    token = _tree_mask_context.set(mask)
    try:
        yield
    finally:
        _tree_mask_context.reset(token)


@contextlib.contextmanager
def attention_backend(backend: str | None) -> Iterator[None]:
    """Within the block (this context only), crossspec attention runs on ``backend``.

    Overrides register()'s choice. The engine runs the target's prefill in a worker thread on CPU
    with "reference", so that only one thread at a time uses Triton's CPU interpreter.
    """
    token = _backend_context.set(backend)
    try:
        yield
    finally:
        _backend_context.reset(token)


# ----------------------------------------------------------------------------------------------
# Mask function (AttentionMaskInterface)
# ----------------------------------------------------------------------------------------------


def crossspec_mask(
    batch_size: int,
    kv_length: int,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    q_length: int | None = None,
    q_offset: int | torch.Tensor = 0,
    cache_position: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """The mask every crossspec layer receives: None, [B, L] left padding, or a dense [B, 1, Q, L].

    Called by HF's ``create_causal_mask`` & co. with keywords: transformers 5.x passes ``q_length``
    and ``q_offset``, 4.57 passes ``cache_position`` instead. See the module docstring for the forms.
    """
    from transformers import masking_utils

    def dense() -> torch.Tensor | None:
        # HF's own sdpa mask, [B, 1, Q, L] bool, always materialised: HF's None ("use is_causal")
        # may mean top-left causal (an empty static cache), while our None means the new tokens last.
        if cache_position is not None:
            size_kwargs = {"cache_position": cache_position}
        else:
            size_kwargs = {"q_length": q_length, "q_offset": q_offset, "use_vmap": use_vmap}
        return masking_utils.sdpa_mask(
            batch_size=batch_size,
            kv_length=kv_length,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **size_kwargs,
            **{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False},
        )

    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    if cache_position is not None:
        # 4.57: reading cache_position[0] would be a host sync. 4.57 forbids the causal skip exactly
        # for compileable (static) caches, the ones whose new tokens are not the last kv positions.
        q_length = cache_position.shape[0]
        new_tokens_last = allow_is_causal_skip
    else:
        # 5.x: a static cache gives a tensor q_offset (to avoid graph breaks); a dynamic one an int.
        new_tokens_last = isinstance(q_offset, int) and q_offset - kv_offset + q_length == kv_length
    if mask_function is not masking_utils.causal_mask_function or use_vmap or not new_tokens_last:
        return dense()

    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    padding = padding.to(torch.bool)
    if _cannot_sync(padding):
        # Trust left padding, but a prefill without cache always has padding among its new tokens.
        return padding if kv_length > q_length else dense()
    hidden = (~padding).sum(-1)
    left_padded = (padding == (torch.arange(kv_length, device=padding.device) >= hidden[:, None])).all()
    prefix_only = hidden.max() <= kv_length - q_length
    is_left_padded, padding_in_prefix, any_padding = torch.stack(
        [left_padded, prefix_only, hidden.any()]
    ).tolist()  # the one host sync
    if not any_padding:
        return None
    if is_left_padded and padding_in_prefix:
        return padding
    return dense()


def _cannot_sync(tensor: torch.Tensor) -> bool:
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or isinstance(tensor, torch.fx.Proxy):
        return True
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------
# Plans: what every layer of one forward needs, computed once
# ----------------------------------------------------------------------------------------------


class AttentionPlan(NamedTuple):
    """How every attention layer of one forward runs (build once, pass as ``crossspec_plan=``).

    Two paths:

    * ``kernel=None``: torch SDPA (grouped-query heads natively) over the first ``kv_limit`` kv
      slots (None: all) with ``mask`` [B, 1, Q, L] bool (True = visible) or, when ``mask`` is None,
      ``is_causal`` (top-left aligned: Q == L) or no mask at all. A query row must see at least one
      slot (SDPA gives NaN otherwise).
    * ``kernel`` = a ``tree_attention`` backend ("triton", "reference"): the op with ``tree_mask``
      (packed int32 from ``pack_tree_mask``, or None = causal), ``kv_start`` and ``kv_end`` [B].

    Layers do not check a plan: its builder does (``runtime.kv_cache.SlotCache.plan``).
    """

    mask: torch.Tensor | None = None
    is_causal: bool = False
    kv_limit: int | None = None
    kernel: str | None = None
    tree_mask: torch.Tensor | None = None
    kv_start: torch.Tensor | None = None
    kv_end: torch.Tensor | None = None


def run_plan(plan: AttentionPlan, query, key, value, scaling: float | None) -> torch.Tensor:
    """Attention of query [B, Hq, Q, D] over key, value [B, Hkv, L, D] as ``plan`` says; [B, Q, Hq, D]."""
    if plan.kv_limit is not None:
        key, value = key[:, :, : plan.kv_limit], value[:, :, : plan.kv_limit]
    if plan.kernel is None:
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=plan.mask,
            is_causal=plan.is_causal,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    else:
        extra = {} if plan.kv_end is None else {"kv_end": plan.kv_end}
        output = _tree_attention_op(
            query,
            key,
            value,
            plan.tree_mask,
            kv_start=plan.kv_start,
            scale=scaling,
            backend=plan.kernel,
            **extra,
        )
    return output.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Attention function (AttentionInterface)
# ----------------------------------------------------------------------------------------------


def crossspec_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    crossspec_tree_mask: torch.Tensor | None = None,
    crossspec_kv_start: torch.Tensor | None = None,
    crossspec_plan: AttentionPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Tree-masked attention with HF's calling convention.

    query [B, Hq, Q, D]; key, value [B, Hkv, L, D] (cache + the Q new tokens, which are the last Q);
    attention_mask as produced by :func:`crossspec_mask` (or a user's 4-D mask);
    ``crossspec_tree_mask`` [Q, Q] / [B, Q, Q] bool (None: :func:`tree_mask`'s, else causal);
    ``crossspec_kv_start`` [B] int: positions < kv_start[b] are hidden (overrides a 2-D mask).
    ``crossspec_plan``: an :class:`AttentionPlan` built once for the whole forward; when given,
    the layer runs it and ignores the mask arguments.
    Returns (output [B, Q, Hq, D], None): attention weights are never materialised.
    """
    if crossspec_plan is not None:
        return run_plan(crossspec_plan, query, key, value, scaling), None
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"crossspec attention: {unsupported!r} is not supported")
    if kwargs.get("output_attentions"):
        _warn_no_weights()
    batch, _, num_queries, _ = query.shape
    kv_len = key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)

    tree = crossspec_tree_mask
    eager = not torch.compiler.is_compiling()  # ContextVars and module state are eager-only
    if tree is None and is_causal and eager:  # the context manager's mask: decoder layers only
        tree = _tree_mask_context.get()
    if tree is not None:
        tree = _check_tree_mask(tree, batch, num_queries, kv_len, query.device)
        if not is_causal:
            raise ValueError("crossspec attention: a tree mask needs a causal (decoder) attention layer")

    kv_start, dense = crossspec_kv_start, None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if tuple(attention_mask.shape) != (batch, kv_len):
                raise ValueError(
                    f"crossspec attention: 2-D attention_mask must be [B, L] = [{batch}, {kv_len}], got "
                    f"{tuple(attention_mask.shape)}"
                )
            if kv_start is None:
                kv_start = (~attention_mask.to(torch.bool)).sum(-1)
        elif attention_mask.dim() == 4:
            dense = attention_mask
        else:
            raise ValueError(
                f"crossspec attention: attention_mask must be None, [B, L] or [B, 1, Q, L], got shape "
                f"{tuple(attention_mask.shape)}"
            )
    if kv_start is not None:
        kv_start = torch.as_tensor(kv_start, device=query.device)
        if kv_start.dim() == 0:
            kv_start = kv_start.expand(batch)

    use_kernel = (
        is_causal
        and dense is None
        and num_queries <= MAX_KERNEL_QUERIES
        and not (module.training and dropout)
    )
    if use_kernel:
        backend = (_backend_context.get() or _settings["backend"]) if eager else None
        extra = {} if backend is None else {"backend": backend}
        output = _tree_attention_op(query, key, value, tree, kv_start=kv_start, scale=scaling, **extra)
    else:
        output = _sdpa(
            query, key, value, dense, tree, kv_start, scaling, dropout if module.training else 0.0, is_causal
        )
    return output.transpose(1, 2).contiguous(), None


@functools.cache
def _warn_no_weights() -> None:
    logger.warning("crossspec attention returns no attention weights (output_attentions=True is ignored)")


def _check_tree_mask(
    tree: torch.Tensor, batch: int, num_queries: int, kv_len: int, device: torch.device
) -> torch.Tensor:
    if not isinstance(tree, torch.Tensor) or tree.dtype != torch.bool:
        got = tree.dtype if isinstance(tree, torch.Tensor) else type(tree).__name__
        raise ValueError(f"crossspec attention: crossspec_tree_mask must be a bool tensor, got {got}")
    if tuple(tree.shape) not in ((num_queries, num_queries), (batch, num_queries, num_queries)):
        raise ValueError(
            f"crossspec attention: crossspec_tree_mask must be [Q, Q] or [B, Q, Q] with B = {batch} and "
            f"Q = {num_queries} new tokens, got shape {tuple(tree.shape)}"
        )
    if num_queries > kv_len:
        raise ValueError(f"crossspec attention: Q = {num_queries} new tokens but only L = {kv_len} kv")
    return tree.to(device)


def _sdpa(query, key, value, dense, tree, kv_start, scaling, dropout, is_causal) -> torch.Tensor:
    """torch SDPA with the mask that is equivalent to the kernel's semantics (plus ``dense``)."""
    batch, q_heads, num_queries, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_heads != kv_heads:
        key = key.repeat_interleave(q_heads // kv_heads, dim=1)
        value = value.repeat_interleave(q_heads // kv_heads, dim=1)
    positions = torch.arange(kv_len, device=query.device)
    padding = None if kv_start is None else (positions >= kv_start.reshape(-1, 1))[:, None, None, :]

    if not is_causal:
        keep, mask = padding, dense
    elif dense is None:
        if tree is None and kv_start is None and num_queries == kv_len:
            return F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, is_causal=True, scale=scaling
            )
        keep, mask = tree_visibility(batch, num_queries, kv_len, tree, kv_start, query.device)[:, None], None
    else:
        # A dense mask already holds causality; the tree restricts its last Q columns (new tokens last).
        keep = None
        if tree is not None:
            keep = tree_visibility(batch, num_queries, kv_len, tree, None, query.device)[:, None]
        if padding is not None:
            keep = padding if keep is None else keep & padding
        mask = dense

    if keep is not None:
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:  # an additive float mask
            mask = mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
    if mask is not None and mask.dtype == torch.bool:
        # A query that sees nothing (a padding position) would give NaN on some SDPA kernels, and NaN
        # leaks into every later layer through 0 * NaN; let it see everything instead (HF does too).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=False, scale=scaling
    )
