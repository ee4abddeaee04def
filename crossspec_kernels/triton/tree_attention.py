"""Triton kernels for tree-masked verification attention (crossspec_kernels.tree_attention).

Flash-decoding with the whole draft tree of a kv head in one tile of queries:

* One program owns one (batch, kv head) group, a block of its query rows and one slice (split) of
  the kv positions. The Hq / Hkv query heads that read a kv head and all Q tree nodes are packed
  into the M dimension of the tile (row r = local head r // Q, node r % Q), so every K/V tile is
  loaded once and multiplied against every query that needs it: GQA and the tree come for free on
  the tensor cores, and the kernel reads each K/V byte once (rows > 128 take a second block of
  rows, whose programs run next to the first and meet the same tile in L2).
* Split-KV: the kv axis is cut into ``num_splits`` slices of whole tiles so batch 1 fills the GPU.
  Each split writes an fp32 partial output and its log-sum-exp; ``_merge_splits_kernel`` combines
  them. With one split the main kernel writes the output directly and no merge runs.
* Prefix tiles (kv position < L - Q) are visible to every query, so they take a path with no mask
  at all; only tiles that reach into the last Q positions (or that a split boundary or kv_start
  cut short) evaluate visibility, reading the tree as packed bits: word j // 32 of row i, bit j % 32.
* Left padding: a row's loop starts at kv_start[b], which also hides any position before it, as in
  the reference (a start past L - Q hides tree nodes too; the op checks the range on CPU).
* Per-row lengths: with kv_end, row b's loop stops at kv_end[b] and its tree is the Q positions
  before it, so rows of one fixed-capacity cache that accepted different numbers of drafts share
  one launch; positions at or past kv_end[b] are never read.
* Softmax runs in base 2 with the scale folded into the exponent, in fp32; rows that see nothing
  end with l = 0 and write zeros.

Offsets are int64 (B·H·L·D passes 2**31 at long contexts); the host reads no tensor values, so
the op is capturable in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from crossspec_kernels.triton._launch import interpreter_serialized

HEAD_DIMS = (64, 80, 96, 128)
MAX_QUERIES = 128  # Q, tree nodes per request: the packed mask holds at most 4 words per row

MIN_BLOCK_M = 16  # tl.dot needs M >= 16
MERGE_BLOCK_ROWS = 16
MIN_TILES_PER_SPLIT = 4  # fewer tiles per program and the prologue/epilogue and merge dominate
MAX_SPLITS = 128
INTERPRETER_SMS = 8  # pretend SM count under TRITON_INTERPRET=1, so CPU tests exercise splits

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q, k, v, m_i, l_i, acc, qk_scale, visible, APPLY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """One online-softmax step (base 2) of q [M, D] against k, v [N, D]; visible [M, N] when masked."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if APPLY_MASK:
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A row that has seen nothing yet keeps m = -inf; exponentiate against 0 instead so that
    # -inf - -inf never makes a NaN (its p and alpha are then exactly 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _tree_attention_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    kv_start_ptr,
    kv_end_ptr,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    stride_qb,
    stride_qh,
    stride_qq,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_mask_b,
    stride_mask_q,
    stride_ob,
    stride_oh,
    stride_oq,
    kv_heads,
    group,
    num_queries,
    kv_len,
    rows,
    num_row_blocks,
    split_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    HAS_KV_END: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    group_id = pid // num_row_blocks  # (batch, kv head)
    row_block = pid % num_row_blocks
    batch = group_id // kv_heads
    kv_head = group_id % kv_heads

    offs_r = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row = local head * Q + node
    row_ok = offs_r < rows
    head = kv_head * group + offs_r // num_queries
    query = offs_r % num_queries
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # constant-folds to all-true when HEAD_DIM is a power of two

    q = tl.load(
        q_ptr + batch * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qq + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    # Row b's keys end at kv_end[b] (its last Q positions are the tree); splits cover the whole
    # capacity L, so those past a row's end see nothing and the merge weighs them 0.
    if HAS_KV_END:
        # Clamping to [0, L + Q] changes no visibility (see reference.tree_visibility) and keeps
        # the arithmetic in int32.
        end = tl.minimum(tl.maximum(tl.load(kv_end_ptr + batch), 0), kv_len + num_queries).to(tl.int32)
        prefix = end - num_queries
        stop = tl.minimum(end, kv_len)
    else:
        prefix = kv_len - num_queries
        stop = kv_len
    lo = split * split_len
    hi = tl.minimum(lo + split_len, stop)
    if HAS_KV_START:
        start = tl.load(kv_start_ptr + batch)
        start = tl.minimum(tl.maximum(start, 0), kv_len).to(tl.int32)  # reference semantics, no overflow
        lo = tl.maximum(lo, start)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    poisoned = tl.zeros((BLOCK_M,), tl.int1)  # queries that saw a non-finite value at a tree tile

    # Prefix: whole tiles in [lo, min(hi, L - Q)) are visible to every query. Their rows are all in
    # bounds, so only the head-dim mask remains (and folds away for D = 64, 128).
    num_full = tl.maximum(tl.minimum(hi, prefix) - lo, 0) // BLOCK_N
    for tile in range(num_full):
        pos = (lo + tile * BLOCK_N + offs_n).to(tl.int64)
        k = tl.load(k_base + pos[:, None] * stride_kl + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + pos[:, None] * stride_vl + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, qk_scale, None, False, DOT_PRECISION)

    # The rest of the split: a partial prefix tile and the tiles holding tree nodes (at most
    # ceil(Q / BLOCK_N) + 1 tiles), not software-pipelined so its buffers do not double the shared
    # memory of the loop above.
    for tile_start in tl.range(lo + num_full * BLOCK_N, hi, BLOCK_N, num_stages=1):
        pos = tile_start + offs_n
        pos_ok = pos < hi
        node = pos - prefix  # tree node index of a kv position; < 0 in the prefix
        in_tree = node >= 0
        if CAUSAL:
            tree_ok = node[None, :] <= query[:, None]
        else:
            safe_node = tl.where(in_tree, node, 0)
            word = tl.load(
                mask_ptr
                + batch * stride_mask_b
                + query[:, None] * stride_mask_q
                + (safe_node // 32)[None, :],
                mask=row_ok[:, None] & (in_tree & pos_ok)[None, :],
                other=0,
            )
            tree_ok = ((word >> (safe_node % 32)[None, :]) & 1) != 0
        visible = pos_ok[None, :] & (~in_tree[None, :] | tree_ok)
        pos64 = pos.to(tl.int64)
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + pos64[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + pos64[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        # p @ v would spread a non-finite value to every query of the tile (0 * NaN = NaN), also to
        # those that do not see it: multiply cleaned values, poison only the queries that see one.
        v_bad = tl.max(((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32), axis=1) > 0  # [N]
        v = tl.where(v_bad[:, None], 0.0, v)
        poisoned |= tl.max((visible & v_bad[None, :]).to(tl.int32), axis=1) > 0
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, qk_scale, visible, True, DOT_PRECISION)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw nothing: acc = 0, so 0
    out = tl.where(poisoned[:, None], float("nan"), out)
    store_mask = row_ok[:, None] & d_ok[None, :]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr
            + batch * stride_ob
            + head[:, None] * stride_oh
            + query[:, None] * stride_oq
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=store_mask,
        )
    else:
        partial_row = (group_id * num_splits + split) * rows + offs_r  # [B·Hkv, splits, rows]
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=store_mask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(partial_lse_ptr + partial_row, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    stride_oq,
    kv_heads,
    group,
    num_queries,
    rows,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max) over the splits of each row."""
    group_id = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = offs_r < rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tile_mask = row_ok[:, None] & d_ok[None, :]

    m_i = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_ROWS,), tl.float32)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), tl.float32)
    for split in range(num_splits):
        partial_row = (group_id * num_splits + split) * rows + offs_r
        lse = tl.load(partial_lse_ptr + partial_row, mask=row_ok, other=float("-inf"))
        part = tl.load(
            partial_out_ptr + partial_row[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_mask, other=0.0
        )
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        weight = tl.exp2(lse - m_safe)
        l_i = l_i * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * part
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    batch = group_id // kv_heads
    head = (group_id % kv_heads) * group + offs_r // num_queries
    query = offs_r % num_queries
    tl.store(
        out_ptr
        + batch * stride_ob
        + head[:, None] * stride_oh
        + query[:, None] * stride_oq
        + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=tile_mask,
    )


# ----------------------------------------------------------------------------------------------
# Launch configuration (host only: shapes in, no tensor values read)
# ----------------------------------------------------------------------------------------------


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


class TileConfig(NamedTuple):
    max_block_m: int  # query rows per program (GQA group x Q); more rows take more row blocks
    block_n: int  # kv positions per tile
    num_warps_small: int  # for row blocks below 64
    num_warps_large: int  # for row blocks of 64 or more
    num_stages: int  # software-pipeline depth of the prefix loop


# 16-bit: 64 x 128 K and V tiles are 32 KB per pipeline stage, 3 stages plus a 128-row query tile
# fit sm_80's 163 KB and sm_90's 227 KB (96-128 KB as compiled, 160-220 registers, no spills, at
# D = 128); two or three programs share an SM when the row block is small. fp32 runs the exact
# (FMA, not tf32) dot, whose operands need far more registers and shared memory: smaller tiles.
TILE_CONFIGS = {
    torch.float16: TileConfig(
        max_block_m=128, block_n=64, num_warps_small=4, num_warps_large=8, num_stages=3
    ),
    torch.bfloat16: TileConfig(
        max_block_m=128, block_n=64, num_warps_small=4, num_warps_large=8, num_stages=3
    ),
    torch.float32: TileConfig(max_block_m=32, block_n=32, num_warps_small=8, num_warps_large=8, num_stages=2),
}


class LaunchPlan(NamedTuple):
    block_m: int
    block_n: int
    num_row_blocks: int
    num_splits: int
    split_len: int  # kv positions per split, a multiple of block_n
    num_warps: int
    num_stages: int


def choose_num_splits(
    batch: int,
    kv_heads: int,
    rows: int,
    kv_len: int,
    head_dim: int,
    itemsize: int,
    multiprocessors: int,
    *,
    block_m: int = 128,
    block_n: int = 64,
) -> int:
    """Split count minimising a bandwidth model of the whole op.

    Time ~ bytes / achieved bandwidth, where bytes = K and V once, plus (for more than one split)
    each split's fp32 partial output written and read back by the merge, and the achieved
    bandwidth grows with the number of programs until every SM has one. More splits fill the GPU
    at batch 1; each one costs rows x D x 8 bytes per (batch, kv head), which matters when many
    query rows share a kv head (GQA x a 64-node tree). Ties go to fewer splits. Not yet calibrated
    on a GPU: the launcher's ``num_splits`` overrides it.
    """
    programs_per_split = batch * kv_heads * triton.cdiv(rows, block_m)
    max_splits = max(1, min(MAX_SPLITS, kv_len // (block_n * MIN_TILES_PER_SPLIT)))
    kv_bytes = 2 * kv_len * head_dim * itemsize
    best, best_cost = 1, math.inf
    for splits in range(1, max_splits + 1):
        partial_bytes = 0 if splits == 1 else splits * rows * head_dim * 8
        fill = min(1.0, programs_per_split * splits / multiprocessors)
        cost = (kv_bytes + partial_bytes) / fill
        if cost < best_cost * (1 - 1e-9):
            best, best_cost = splits, cost
    return best


def split_length(kv_len: int, num_splits: int, block_n: int) -> int:
    """Positions per split: whole tiles, so only kv_start and the tree tail cut a tile short."""
    return triton.cdiv(triton.cdiv(kv_len, num_splits), block_n) * block_n


def launch_plan(q: torch.Tensor, k: torch.Tensor, num_splits: int | None = None) -> LaunchPlan:
    """Tiles, warps and splits for q [B, Hq, Q, D], k [B, Hkv, L, D], from shapes and dtype only
    (no tensor values: capturable). ``num_splits`` overrides the model (tests, tuning)."""
    return _launch_plan(
        *q.shape, *k.shape[1:3], q.dtype, k.element_size(), num_multiprocessors(q.device), num_splits
    )


# Every layer of a forward asks for the same shapes: plan once per shape, not once per call (the
# split search is a Python loop). Bounded, because a growing cache makes a new L every step.
@functools.lru_cache(maxsize=4096)
def _launch_plan(
    batch, q_heads, num_queries, head_dim, kv_heads, kv_len, dtype, itemsize, multiprocessors, num_splits
) -> LaunchPlan:
    tiles = TILE_CONFIGS[dtype]
    rows = q_heads // kv_heads * num_queries
    block_m = min(tiles.max_block_m, max(MIN_BLOCK_M, triton.next_power_of_2(rows)))
    if num_splits is None:
        num_splits = choose_num_splits(
            batch,
            kv_heads,
            rows,
            kv_len,
            head_dim,
            itemsize,
            multiprocessors,
            block_m=block_m,
            block_n=tiles.block_n,
        )
    num_splits = max(1, min(int(num_splits), triton.cdiv(kv_len, tiles.block_n)))
    split_len = split_length(kv_len, num_splits, tiles.block_n)
    return LaunchPlan(
        block_m=block_m,
        block_n=tiles.block_n,
        num_row_blocks=triton.cdiv(rows, block_m),
        num_splits=triton.cdiv(kv_len, split_len),  # rounding to whole tiles can leave fewer
        split_len=split_len,
        num_warps=tiles.num_warps_large if block_m >= 64 else tiles.num_warps_small,
        num_stages=tiles.num_stages,
    )


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


@interpreter_serialized
def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed_mask: torch.Tensor | None,
    kv_start: torch.Tensor | None,
    scale: float,
    *,
    kv_end: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Launcher. Inputs come checked from ops/tree_attention.py: q [B, Hq, Q, D], k and v
    [B, Hkv, L, D] with unit-stride head dims; packed_mask int32 [1 or B, Q, ceil(Q/32)] with
    unit-stride words, or None for causal; kv_start and kv_end [B] integer or None (0 and L).
    ``num_splits`` overrides the heuristic (tests use it). Returns a new contiguous [B, Hq, Q, D]
    tensor in q's dtype."""
    batch, q_heads, num_queries, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    # (1) check what the kernel itself relies on
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"triton tree_attention: head dim must be one of {HEAD_DIMS}, got {head_dim}")
    if not 1 <= num_queries <= MAX_QUERIES:
        raise ValueError(f"triton tree_attention: Q must be in [1, {MAX_QUERIES}], got {num_queries}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("triton tree_attention: q, k and v need a unit-stride head dim")
    if packed_mask is not None and (packed_mask.dtype != torch.int32 or packed_mask.stride(-1) != 1):
        raise ValueError("triton tree_attention: the packed mask must be int32 with unit-stride words")
    group = q_heads // kv_heads
    rows = group * num_queries
    plan = launch_plan(q, k, num_splits)
    num_splits = plan.num_splits

    # (2) allocate
    out = torch.empty(batch, q_heads, num_queries, head_dim, dtype=q.dtype, device=q.device)
    single = num_splits == 1
    if single:
        partial_out = partial_lse = out  # never touched
    else:
        partial_out = torch.empty(
            batch * kv_heads, num_splits, rows, head_dim, dtype=torch.float32, device=q.device
        )
        partial_lse = torch.empty(batch * kv_heads, num_splits, rows, dtype=torch.float32, device=q.device)

    # (3) launch
    block_d = triton.next_power_of_2(head_dim)
    causal = packed_mask is None
    mask_arg = q if causal else packed_mask
    mask_strides = (
        (0, 0)
        if causal
        else (packed_mask.stride(0) if packed_mask.shape[0] > 1 else 0, packed_mask.stride(1))
    )
    _tree_attention_split_kernel[(batch * kv_heads * plan.num_row_blocks, num_splits)](
        q,
        k,
        v,
        mask_arg,
        q if kv_start is None else kv_start,
        q if kv_end is None else kv_end,
        out,
        partial_out,
        partial_lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        *mask_strides,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        kv_heads,
        group,
        num_queries,
        kv_len,
        rows,
        plan.num_row_blocks,
        plan.split_len,
        scale * _LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_D=block_d,
        CAUSAL=causal,
        HAS_KV_START=kv_start is not None,
        HAS_KV_END=kv_end is not None,
        SINGLE_SPLIT=single,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    if not single:
        _merge_splits_kernel[(batch * kv_heads, triton.cdiv(rows, MERGE_BLOCK_ROWS))](
            partial_out,
            partial_lse,
            out,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            kv_heads,
            group,
            num_queries,
            rows,
            num_splits,
            HEAD_DIM=head_dim,
            BLOCK_ROWS=MERGE_BLOCK_ROWS,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
