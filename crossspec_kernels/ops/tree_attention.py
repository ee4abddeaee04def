"""Tree-masked verification attention: validation and backend dispatch.

Backends: ``triton`` (crossspec_kernels/triton/tree_attention.py) and ``reference``
(crossspec_kernels/reference.py, the spec). There is no ``cuda`` (C++) backend for this op.

The tree mask is given either as bool (``[Q, Q]`` or ``[B, Q, Q]``) or already packed as int32 bits
by :func:`pack_tree_mask` (``[Q, W]`` or ``[1 or B, Q, W]``, W = ceil(Q / 32)): the dtype says which.
A verification step packs its tree once and passes the packed mask to every layer.
"""

from __future__ import annotations

import math

import torch

from crossspec_kernels import reference
from crossspec_kernels.ops._dispatch import pick_backend, triton_available, triton_interpreting

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)
TRITON_HEAD_DIMS = (64, 80, 96, 128)
MAX_QUERIES = 128
BITS_PER_WORD = 32


def pack_tree_mask(tree_mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tree mask [Q, Q] or [B, Q, Q] into int32 bits [1 or B, Q, ceil(Q/32)].

    Bit ``j % 32`` of word ``j // 32`` in row i is ``tree_mask[.., i, j]`` (query i may attend tree
    node j); unused high bits are 0. Pure tensor ops, no host sync: build it once per verification
    step (inside a CUDA graph if you like) and pass it to ``tree_attention`` in every layer.
    """
    if not isinstance(tree_mask, torch.Tensor):
        raise TypeError(f"pack_tree_mask: tree_mask must be a torch.Tensor, got {type(tree_mask).__name__}")
    if tree_mask.dtype != torch.bool:
        raise ValueError(f"pack_tree_mask: tree_mask must be bool, got {tree_mask.dtype}")
    if tree_mask.dim() not in (2, 3) or tree_mask.shape[-1] != tree_mask.shape[-2]:
        raise ValueError(
            f"pack_tree_mask: tree_mask must be [Q, Q] or [B, Q, Q], got shape {tuple(tree_mask.shape)}"
        )
    mask = tree_mask if tree_mask.dim() == 3 else tree_mask[None]
    batch, num_queries, _ = mask.shape
    words = math.ceil(num_queries / BITS_PER_WORD)
    padded = torch.zeros(batch, num_queries, words * BITS_PER_WORD, dtype=torch.int64, device=mask.device)
    padded[:, :, :num_queries] = mask
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=mask.device) << torch.arange(
        BITS_PER_WORD, device=mask.device
    )
    packed = (padded.view(batch, num_queries, words, BITS_PER_WORD) * weights).sum(-1)
    # Reinterpret the low 32 bits as a signed int32 (bit 31 set -> negative).
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_tree_mask(packed_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Inverse of :func:`pack_tree_mask`: int32 [.., Q, W] -> bool [.., Q, Q]."""
    shifts = torch.arange(BITS_PER_WORD, device=packed_mask.device, dtype=torch.int32)
    bits = (packed_mask[..., None] >> shifts) & 1  # [.., Q, W, 32]
    return bits.flatten(-2)[..., :num_queries].bool()


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    *,
    kv_start: int | torch.Tensor | None = None,
    kv_end: int | torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of Q draft-tree nodes over a KV cache whose last Q positions are those nodes.

    Args:
        q: [B, Hq, Q, D] fp16/bf16/fp32, the tree nodes' queries (1 <= Q <= 128).
        k, v: [B, Hkv, L, D], same dtype and device, L >= Q, Hq % Hkv == 0 (query head h reads kv
            head h // (Hq / Hkv)). Any strides with a unit-stride head dim (HF cache views).
        tree_mask: query i may attend tree node j. bool [Q, Q] or [B, Q, Q], or int32 bits from
            :func:`pack_tree_mask` ([Q, W] or [1 or B, Q, W]; the dtype tells them apart). None =
            causal among the Q nodes (a chain). Every position before the tree (the prefix) is
            visible.
        kv_start: int or [B] integer tensor: positions < kv_start[b] are left padding, visible to
            nobody. In [0, kv_end[b] - Q].
        kv_end: int or [B] integer tensor in [Q, L], default L: row b's cache ends at kv_end[b]
            (positions >= kv_end[b] are invisible, and its Q tree nodes are the positions
            kv_end[b] - Q .. kv_end[b] - 1). One batched call over a fixed-capacity cache whose rows
            have different lengths.
        scale: softmax scale, default D ** -0.5.
        backend: "triton" or "reference"; None = triton for CUDA tensors when the head dim is one
            it supports (64, 80, 96, 128), else the reference; on CPU the reference, or triton
            under TRITON_INTERPRET=1. There is no "cuda" backend for this op.

    kv_start and kv_end values are range-checked only on the CPU and outside torch.compile
    (reading a CUDA tensor is a host sync); elsewhere every backend gives any value the reference's
    meaning (``reference.tree_visibility``).

    Returns:
        [B, Hq, Q, D] in q's dtype; a query that sees no position gets zeros.
    """
    _check_qkv(q, k, v)
    batch, _, num_queries, head_dim = q.shape
    kv_len = k.shape[2]
    device = q.device
    _check_tree_mask(tree_mask, batch, num_queries, device)
    read_values = not torch.compiler.is_compiling()
    kv_start = _kv_rows(
        "kv_start", kv_start, batch, device, read_values, "[0, L - Q]", 0, kv_len - num_queries
    )
    kv_end = _kv_rows("kv_end", kv_end, batch, device, read_values, "[Q, L]", num_queries, kv_len)
    both = kv_start is not None and kv_end is not None
    if both and read_values and device.type == "cpu" and bool((kv_start > kv_end - num_queries).any()):
        raise ValueError(
            "tree_attention: kv_start must be <= kv_end - Q in every row (padding ends before the "
            f"tree), got kv_start {kv_start.tolist()} and kv_end {kv_end.tolist()} with Q = {num_queries}"
        )
    scale = _check_scale(scale, head_dim)
    backend = _pick_backend(backend, device, q.dtype, head_dim)
    return run_tree_attention(q, k, v, tree_mask, kv_start, kv_end, scale, backend)


def run_tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """``tree_attention`` without validation or dispatch: what a model calls in every layer with a
    plan built (and checked) once per forward.

    tree_mask: None (causal), or preferably the int32 [1 or B, Q, W] of ``pack_tree_mask`` (a bool
    mask is packed, or for the reference unpacked, on every call); kv_start, kv_end: [B] integer
    tensors or None (0 and L); scale: a float; backend: "triton" or "reference". Under
    torch.compile this is the ``crossspec::tree_attention`` custom op. Nothing is checked.
    """
    if torch.compiler.is_compiling():
        return torch.ops.crossspec.tree_attention(q, k, v, tree_mask, kv_start, kv_end, scale, backend)
    return _run_backend(q, k, v, tree_mask, kv_start, kv_end, scale, backend)


def _run_backend(q, k, v, tree_mask, kv_start, kv_end, scale: float, backend: str) -> torch.Tensor:
    packed = tree_mask is not None and tree_mask.dtype == torch.int32
    if backend == "reference":
        if packed:
            tree_mask = unpack_tree_mask(tree_mask, q.shape[2])
        return reference.tree_attention(q, k, v, tree_mask, kv_start=kv_start, kv_end=kv_end, scale=scale)
    from crossspec_kernels.triton.tree_attention import tree_attention as triton_tree_attention

    if tree_mask is not None:
        if not packed:
            tree_mask = pack_tree_mask(tree_mask)
        elif tree_mask.dim() == 2:
            tree_mask = tree_mask[None]
        if tree_mask.stride(-1) != 1:
            tree_mask = tree_mask.contiguous()
    return triton_tree_attention(q, k, v, tree_mask, kv_start, scale, kv_end=kv_end)


@torch.library.custom_op("crossspec::tree_attention", mutates_args=())
def _tree_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """crossspec::tree_attention: ``run_tree_attention`` eagerly; a new [B, Hq, Q, D] tensor."""
    return _run_backend(q, k, v, tree_mask, kv_start, kv_end, scale, backend)


@_tree_attention_op.register_fake
def _(q, k, v, tree_mask, kv_start, kv_end, scale, backend):
    return q.new_empty(q.shape)


def _pick_backend(backend: str | None, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    if backend == "cuda":
        raise ValueError(
            "tree_attention: there is no 'cuda' (C++) backend for this op; use backend='triton', "
            "'reference' or None"
        )
    if backend is not None and backend not in ("triton", "reference"):
        raise ValueError(f"tree_attention: backend must be 'triton', 'reference' or None, got {backend!r}")
    if backend is None:
        triton_can_run = triton_available() and head_dim in TRITON_HEAD_DIMS
        if device.type == "cuda":
            return "triton" if triton_can_run else "reference"
        if device.type == "cpu" and triton_interpreting() and triton_can_run and dtype != torch.bfloat16:
            return "triton"
        return "reference"
    backend = pick_backend("tree_attention", backend, device, dtype)
    if backend == "triton" and head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"tree_attention: backend='triton' supports head dims {TRITON_HEAD_DIMS}, got D = {head_dim} "
            "(the reference takes any)"
        )
    return backend


def _check_qkv(q, k, v) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tree_attention: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if q.dim() != 4:
        raise ValueError(f"tree_attention: q must be 4-D [B, Hq, Q, D], got shape {tuple(q.shape)}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise ValueError(
                f"tree_attention: {name} must be 4-D [B, Hkv, L, D], got shape {tuple(tensor.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(
            f"tree_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    batch, q_heads, num_queries, head_dim = q.shape
    kv_batch, kv_heads, kv_len, kv_dim = k.shape
    if batch < 1:
        raise ValueError(f"tree_attention: batch size must be >= 1, got {batch}")
    if kv_batch != batch:
        raise ValueError(f"tree_attention: k and v have batch {kv_batch} but q has batch {batch}")
    if kv_dim != head_dim:
        raise ValueError(f"tree_attention: k and v have head dim {kv_dim} but q has head dim {head_dim}")
    if head_dim < 1:
        raise ValueError(f"tree_attention: head dim must be >= 1, got {head_dim}")
    if kv_heads < 1 or q_heads % kv_heads != 0 or q_heads < kv_heads:
        raise ValueError(
            f"tree_attention: query heads Hq = {q_heads} must be a positive multiple of kv heads "
            f"Hkv = {kv_heads}"
        )
    if not 1 <= num_queries <= MAX_QUERIES:
        raise ValueError(f"tree_attention: Q (tree nodes) must be in [1, {MAX_QUERIES}], got {num_queries}")
    if kv_len < num_queries:
        raise ValueError(
            f"tree_attention: kv length L = {kv_len} must be >= Q = {num_queries} (the tree nodes are the "
            "last Q kv positions)"
        )
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tree_attention: {name} must be fp16, bf16 or fp32, got {tensor.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"tree_attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}"
        )
    if not q.device == k.device == v.device:
        raise ValueError(
            f"tree_attention: q, k and v must be on one device, got {q.device}, {k.device} and {v.device}"
        )
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.stride(-1) != 1:
            raise ValueError(
                f"tree_attention: {name} must have a unit-stride last (head) dim, got strides "
                f"{tuple(tensor.stride())} (any other strides are fine)"
            )


def _check_tree_mask(tree_mask, batch: int, num_queries: int, device: torch.device) -> None:
    if tree_mask is None:
        return
    if not isinstance(tree_mask, torch.Tensor):
        raise TypeError(
            f"tree_attention: tree_mask must be a torch.Tensor or None, got {type(tree_mask).__name__}"
        )
    if tree_mask.device != device:
        raise ValueError(f"tree_attention: tree_mask is on {tree_mask.device} but q is on {device}")
    if tree_mask.dtype == torch.bool:
        if tree_mask.shape not in ((num_queries, num_queries), (batch, num_queries, num_queries)):
            raise ValueError(
                f"tree_attention: bool tree_mask must be [Q, Q] = [{num_queries}, {num_queries}] or "
                f"[B, Q, Q] = [{batch}, {num_queries}, {num_queries}], got shape {tuple(tree_mask.shape)}"
            )
    elif tree_mask.dtype == torch.int32:
        words = math.ceil(num_queries / BITS_PER_WORD)
        if tree_mask.shape not in (
            (num_queries, words),
            (1, num_queries, words),
            (batch, num_queries, words),
        ):
            raise ValueError(
                f"tree_attention: packed (int32) tree_mask must be [Q, W] = [{num_queries}, {words}] or "
                f"[1 or B, Q, W] with B = {batch} (see pack_tree_mask), got shape {tuple(tree_mask.shape)}"
            )
    else:
        raise ValueError(
            f"tree_attention: tree_mask must be bool (dense) or int32 (from pack_tree_mask), got {tree_mask.dtype}"
        )


def _kv_rows(
    name: str, value, batch: int, device: torch.device, read_values: bool, span: str, low: int, high: int
):
    """kv_start / kv_end as a [B] integer tensor (None stays None), values in [low, high] (``span``
    names that range): always for an int, for a tensor only where reading it is free."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype not in _INT_DTYPES:
            raise ValueError(f"tree_attention: {name} must be an integer tensor, got {value.dtype}")
        if value.shape != (batch,):
            raise ValueError(
                f"tree_attention: {name} must be a [B] = [{batch}] tensor, got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"tree_attention: {name} is on {value.device} but q is on {device}")
        if read_values and device.type == "cpu" and bool(((value < low) | (value > high)).any()):
            raise ValueError(
                f"tree_attention: {name} values must be in {span} = [{low}, {high}], got {value.tolist()}"
            )
        return value if value.stride(0) == 1 else value.contiguous()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"tree_attention: {name} must be an int, a [B] tensor or None, got {type(value).__name__}"
        )
    if not low <= value <= high:
        raise ValueError(f"tree_attention: {name} must be in {span} = [{low}, {high}], got {value}")
    return torch.full((batch,), value, dtype=torch.int32, device=device)


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"tree_attention: scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"tree_attention: scale must be finite, got {scale}")
    return float(scale)
