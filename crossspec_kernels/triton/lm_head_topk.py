"""Triton kernels for the fused LM head + log-softmax + top-k (crossspec_kernels.lm_head_topk).

Decode-time shapes (M <= 64 rows, V ~ 32k, d ~ 4k) are bound by reading the LM-head weight W
[V, d] once, so the design is: every byte of W is read by exactly one program, and nothing of size
M x V is written unless the caller asks for the full distribution.

* ``_lm_head_topk_split_kernel``: grid over vocabulary splits (whole tiles of BLOCK_V ids), one
  block of all M rows per program (BLOCK_M = next power of two >= M, 16..64), so each W tile is
  loaded once and multiplied against every row on the tensor cores. Per tile it computes the
  logits [BLOCK_M, BLOCK_V] in fp32 (looping over d in BLOCK_K chunks), divides by the
  temperature, updates an online max / sum-exp per row, and merges the tile into a running top-k
  kept as a [BLOCK_M, K_PAD] tile of (value, id). It writes those partials per split (and the
  scaled fp32 logits when probabilities are wanted).
* ``_lm_head_topk_merge_kernel``: one program per row combines the splits' (max, sum-exp) into
  the log-sum-exp and their top-k candidates into the sorted top-k, and writes log-probs and ids.
* ``_normalise_probs_kernel`` (only with ``return_probs``): probs = exp(logit - lse) in place.

Running top-k: K_PAD rounds of "take the best of the two sources (running tile, new tile), ties to
the lower id, and mask it out". Each round is two row reductions over a [BLOCK_M, BLOCK_V] tile,
cheap next to the BLOCK_V x d multiply-adds of the same tile, needs no sort network over packed
keys (fp32 value + int32 id do not fit a 32-bit key, and tl.sort on 64-bit keys is costly), and
gives the lower-id-first order exactly. Most tiles cannot change the running top-k once it is
full (no row's tile maximum beats that row's k-th value), so those tiles skip the rounds.

Offsets are int64 (M x V and V x d pass 2**31 for big vocabularies); the host reads no tensor
values, so the op can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from crossspec_kernels.triton._launch import interpreter_serialized

MAX_ROWS = 64  # M: one row block, so W is read once
MAX_K = 16
MIN_BLOCK_M = 16  # tl.dot needs M >= 16
INTERPRETER_SMS = 8  # pretend SM count under TRITON_INTERPRET=1, so CPU tests exercise splits
PROGRAMS_PER_SM = 2
NORMALISE_BLOCK = 1024
_ID_NONE = 2**31 - 1  # id of an empty slot: sorts after every real id


@triton.jit
def _row_best(values, ids):
    """Per row: the largest value and, among equal ones, the lowest id."""
    best = tl.max(values, axis=1)
    best_id = tl.min(tl.where(values == best[:, None], ids, 2147483647), axis=1)
    return best, best_id


@triton.jit
def _merge_topk(run_v, run_i, tile_v, tile_i, K_PAD: tl.constexpr):
    """Top K_PAD (value desc, id asc) of the union of run [R, K_PAD] and tile [R, N]."""
    cols = tl.arange(0, K_PAD)[None, :]
    new_v = tl.full(run_v.shape, float("-inf"), tl.float32)
    new_i = tl.full(run_i.shape, 2147483647, tl.int32)
    for r in tl.static_range(K_PAD):
        tile_best, tile_id = _row_best(tile_v, tile_i)
        run_best, run_id = _row_best(run_v, run_i)
        take_tile = (tile_best > run_best) | ((tile_best == run_best) & (tile_id < run_id))
        best = tl.where(take_tile, tile_best, run_best)
        best_id = tl.where(take_tile, tile_id, run_id)
        new_v = tl.where(cols == r, best[:, None], new_v)
        new_i = tl.where(cols == r, best_id[:, None], new_i)
        hit_tile = take_tile[:, None] & (tile_i == tile_id[:, None])
        tile_v = tl.where(hit_tile, float("-inf"), tile_v)
        tile_i = tl.where(hit_tile, 2147483647, tile_i)
        hit_run = (~take_tile)[:, None] & (run_i == run_id[:, None])
        run_v = tl.where(hit_run, float("-inf"), run_v)
        run_i = tl.where(hit_run, 2147483647, run_i)
    return new_v, new_i


@triton.jit
def _lm_head_topk_split_kernel(
    hidden_ptr,
    weight_ptr,
    logits_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_val_ptr,
    part_id_ptr,
    stride_hm,
    stride_wv,
    stride_lm,
    num_rows,
    vocab,
    hidden_dim,
    tiles_per_split,
    temperature,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_PAD: tl.constexpr,
    WRITE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_rows
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    run_v = tl.full((BLOCK_M, K_PAD), float("-inf"), tl.float32)
    run_i = tl.full((BLOCK_M, K_PAD), 2147483647, tl.int32)

    first_tile = split * tiles_per_split
    for tile in range(tiles_per_split):
        vocab_start = (first_tile + tile) * BLOCK_V  # int64
        ids = vocab_start + offs_v
        id_ok = ids < vocab
        # Swap AB: W is the MMA's M operand (BLOCK_V >= 64 rows) and the few hidden rows its N, so
        # M = 1..16 does not waste a 64-row MMA, and the W tile goes HBM -> shared memory
        # (cp.async, pipelined) -> MMA without a register transpose.
        acc = tl.zeros((BLOCK_V, BLOCK_M), tl.float32)
        for k_start in range(0, hidden_dim, BLOCK_K):
            kk = k_start + offs_k
            k_ok = kk < hidden_dim
            h = tl.load(
                hidden_ptr + offs_m[:, None] * stride_hm + kk[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                weight_ptr + ids[:, None] * stride_wv + kk[None, :],
                mask=id_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(w, tl.trans(h), acc, input_precision=DOT_PRECISION)
        logits = tl.where(id_ok[None, :], tl.trans(acc) / temperature, float("-inf"))
        if WRITE_LOGITS:
            tl.store(
                logits_ptr + offs_m[:, None].to(tl.int64) * stride_lm + ids[None, :],
                logits,
                mask=row_ok[:, None] & id_ok[None, :],
            )
        # Online log-sum-exp (natural base, as the reference). While every logit so far is -inf
        # (-inf logits are legal: a -inf weight entry), subtract 0 instead of m_new, so that
        # exp(-inf - -inf) = NaN cannot poison a row that has finite logits elsewhere. A NaN or +inf
        # logit does make l_i NaN (exp(NaN), exp(inf - inf)): the merge turns that into the
        # reference's all-NaN row.
        tile_max = tl.max(logits, axis=1)
        m_new = tl.maximum(m_i, tile_max)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_sub) + tl.sum(tl.exp(logits - m_sub[:, None]), axis=1)
        m_i = m_new
        # Skip the top-k rounds when no real row's tile maximum beats its k-th best so far (tile ids
        # are all higher than the running ones, so an equal value cannot enter), unless the k-th
        # best is -inf: then an empty slot (or a -inf logit) may still take a -inf logit of this
        # tile, as the reference's stable sort puts -inf ids after the finite ones, lowest first.
        kth = tl.min(run_v, axis=1)
        wants_tile = (tile_max > kth) | (kth == float("-inf"))
        if tl.max(tl.where(row_ok, wants_tile.to(tl.int32), 0)) > 0:
            tile_i = tl.where(id_ok, ids.to(tl.int32), 2147483647)
            tile_i = tl.broadcast_to(tile_i[None, :], (BLOCK_M, BLOCK_V))
            run_v, run_i = _merge_topk(run_v, run_i, logits, tile_i, K_PAD)

    part_row = split * BLOCK_M + offs_m  # partials [splits, BLOCK_M]
    tl.store(part_max_ptr + part_row, m_i)
    tl.store(part_sum_ptr + part_row, l_i)
    cols = tl.arange(0, K_PAD)
    tl.store(part_val_ptr + part_row[:, None] * K_PAD + cols[None, :], run_v)
    tl.store(part_id_ptr + part_row[:, None] * K_PAD + cols[None, :], run_i)


@triton.jit
def _lm_head_topk_merge_kernel(
    part_max_ptr,
    part_sum_ptr,
    part_val_ptr,
    part_id_ptr,
    logprobs_ptr,
    ids_ptr,
    lse_ptr,
    num_splits,
    k,
    BLOCK_M: tl.constexpr,
    K_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    part_row = splits.to(tl.int64) * BLOCK_M + row
    m_s = tl.load(part_max_ptr + part_row, mask=split_ok, other=float("-inf"))
    l_s = tl.load(part_sum_ptr + part_row, mask=split_ok, other=0.0)
    m = tl.max(m_s, axis=0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)  # all -inf: lse = -inf, not NaN (see the split)
    lse = m + tl.log(tl.sum(l_s * tl.exp(m_s - m_sub), axis=0))
    # The reference's log_softmax is NaN in every column when a row has a NaN or +inf logit (then
    # lse is NaN here) or only -inf logits (lse = -inf); its stable sort then keeps ids 0..k-1.
    # Follow it exactly, so a non-finite hidden row never yields an id outside [0, V).
    defined = lse > float("-inf")

    # Candidates of every split as one [1, SPLITS_PAD * K_PAD] row; K_PAD rounds pick the best.
    offs_c = tl.arange(0, SPLITS_PAD * K_PAD)
    cand_split = offs_c // K_PAD
    cand_ok = cand_split < num_splits
    cand_off = (cand_split.to(tl.int64) * BLOCK_M + row) * K_PAD + offs_c % K_PAD
    cand_v = tl.load(part_val_ptr + cand_off, mask=cand_ok, other=float("-inf"))[None, :]
    cand_i = tl.load(part_id_ptr + cand_off, mask=cand_ok, other=2147483647)[None, :]
    empty_v = tl.full((1, K_PAD), float("-inf"), tl.float32)
    empty_i = tl.full((1, K_PAD), 2147483647, tl.int32)
    top_v, top_i = _merge_topk(empty_v, empty_i, cand_v, cand_i, K_PAD)

    cols = tl.arange(0, K_PAD)[None, :]
    out_mask = cols < k
    top_v = tl.where(defined, top_v - lse, float("nan"))
    top_i = tl.where(defined, top_i, cols)
    tl.store(logprobs_ptr + row * k + cols, top_v, mask=out_mask)
    tl.store(ids_ptr + row * k + cols, top_i.to(tl.int64), mask=out_mask)
    tl.store(lse_ptr + row, tl.where(defined, lse, float("nan")))  # probs: all NaN, as the reference


@triton.jit
def _normalise_probs_kernel(probs_ptr, lse_ptr, stride_pm, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < vocab
    lse = tl.load(lse_ptr + row)
    logits = tl.load(probs_ptr + row * stride_pm + offs, mask=ok, other=float("-inf"))
    tl.store(probs_ptr + row * stride_pm + offs, tl.exp(logits - lse), mask=ok)


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


class LaunchPlan(NamedTuple):
    block_m: int
    block_v: int
    block_k: int
    k_pad: int
    tiles_per_split: int
    num_splits: int
    num_warps: int
    num_stages: int


def launch_plan(
    num_rows: int,
    vocab: int,
    k: int,
    dtype: torch.dtype,
    multiprocessors: int,
    *,
    num_splits: int | None = None,
) -> LaunchPlan:
    """Tiles and splits. Splits: about PROGRAMS_PER_SM programs per SM (each streams a contiguous
    slice of W, so the whole GPU pulls on HBM at M = 1); their partials cost splits x M x (8 + 8 K)
    bytes, under 1% of W at decode shapes. Not yet tuned on a GPU; ``num_splits`` overrides it."""
    block_m = max(MIN_BLOCK_M, triton.next_power_of_2(num_rows))
    if dtype == torch.float32:
        # The exact (FMA) fp32 dot needs far more registers than an MMA: smaller tiles.
        block_v, block_k, num_warps, num_stages = 64, 32, 4, 2
    else:
        block_v, block_k = 128, 64
        num_warps, num_stages = (4, 4) if block_m <= 32 else (8, 3)
    num_tiles = triton.cdiv(vocab, block_v)
    if num_splits is None:
        num_splits = multiprocessors * PROGRAMS_PER_SM
    num_splits = max(1, min(int(num_splits), num_tiles))
    tiles_per_split = triton.cdiv(num_tiles, num_splits)
    return LaunchPlan(
        block_m=block_m,
        block_v=block_v,
        block_k=block_k,
        k_pad=max(2, triton.next_power_of_2(k)),
        tiles_per_split=tiles_per_split,
        num_splits=triton.cdiv(num_tiles, tiles_per_split),  # every split gets >= 1 tile
        num_warps=num_warps,
        num_stages=num_stages,
    )


def merge_num_warps(splits_pad: int, k_pad: int) -> int:
    """The merge holds every split's candidates of its row at once (H100: 256 x 16): spread them
    over enough threads that they stay in registers (<= 16 values + 16 ids per thread)."""
    return max(4, min(16, splits_pad * k_pad // (32 * 16)))


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


@interpreter_serialized
def lm_head_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    temperature: float,
    return_probs: bool,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launcher. Inputs come checked from ops/lm_head_topk.py: hidden [M, d] and weight [V, d] of
    one dtype with unit-stride last dims, 1 <= M <= 64, 1 <= k <= min(16, V), temperature > 0.
    Returns (logprobs [M, k] fp32, ids [M, k] int64, probs [M, V] fp32 or None)."""
    num_rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    # (1) check what the kernel itself relies on
    if not 1 <= num_rows <= MAX_ROWS:
        raise ValueError(f"triton lm_head_topk: M must be in [1, {MAX_ROWS}], got {num_rows}")
    if not 1 <= k <= min(MAX_K, vocab):
        raise ValueError(f"triton lm_head_topk: k must be in [1, min({MAX_K}, V = {vocab})], got {k}")
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"triton lm_head_topk: hidden and weight must share a dtype, got {hidden.dtype}, {weight.dtype}"
        )
    if hidden.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("triton lm_head_topk: hidden and weight need a unit-stride last dim")
    device = hidden.device
    plan = launch_plan(num_rows, vocab, k, weight.dtype, num_multiprocessors(device), num_splits=num_splits)

    # (2) allocate
    logprobs = torch.empty(num_rows, k, dtype=torch.float32, device=device)
    ids = torch.empty(num_rows, k, dtype=torch.int64, device=device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=device)
    probs = torch.empty(num_rows, vocab, dtype=torch.float32, device=device) if return_probs else None
    part_max = torch.empty(plan.num_splits, plan.block_m, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_val = torch.empty(plan.num_splits, plan.block_m, plan.k_pad, dtype=torch.float32, device=device)
    part_id = torch.empty(plan.num_splits, plan.block_m, plan.k_pad, dtype=torch.int32, device=device)

    # (3) launch
    splits_pad = triton.next_power_of_2(plan.num_splits)
    _lm_head_topk_split_kernel[(plan.num_splits,)](
        hidden,
        weight,
        part_max if probs is None else probs,
        part_max,
        part_sum,
        part_val,
        part_id,
        hidden.stride(0),
        weight.stride(0),
        0 if probs is None else probs.stride(0),
        num_rows,
        vocab,
        hidden_dim,
        plan.tiles_per_split,
        float(temperature),
        BLOCK_M=plan.block_m,
        BLOCK_V=plan.block_v,
        BLOCK_K=plan.block_k,
        K_PAD=plan.k_pad,
        WRITE_LOGITS=probs is not None,
        DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    _lm_head_topk_merge_kernel[(num_rows,)](
        part_max,
        part_sum,
        part_val,
        part_id,
        logprobs,
        ids,
        lse,
        plan.num_splits,
        k,
        BLOCK_M=plan.block_m,
        K_PAD=plan.k_pad,
        SPLITS_PAD=splits_pad,
        num_warps=merge_num_warps(splits_pad, plan.k_pad),
    )
    if probs is not None:
        _normalise_probs_kernel[(num_rows, triton.cdiv(vocab, NORMALISE_BLOCK))](
            probs, lse, probs.stride(0), vocab, BLOCK=NORMALISE_BLOCK, num_warps=4
        )
    return logprobs, ids, probs
