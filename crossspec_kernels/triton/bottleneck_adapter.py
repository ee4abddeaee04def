"""Triton kernel for the bottleneck adapter ``up(GELU(down(LayerNorm(x)))) + residual(x)``.

Runs as ONE launch before ``lm_head_topk`` (not as a prologue of it): at M <= 64 rows the adapter
is tiny next to streaming the V x d LM head, and a prologue inside lm_head_topk's ~250 vocab-split
programs would make every one of them recompute it.

Design: grid over output-d tiles (BLOCK_N columns of d_target); every program holds all M rows in
one row block (BLOCK_M = next power of two >= M, 16..64, since tl.dot needs >= 16) and

1. computes the LayerNorm statistics of its rows over d_draft in fp32 (two passes: mean, then
   the centred variance, so large means do not cancel),
2. loops over the rank in BLOCK_R chunks: h = x_norm @ down_w[chunk].T (+ bias) with fp32
   accumulation (x is normalised on the fly, chunk by chunk over d_draft), exact-erf GELU, then
   acc += GELU(h) @ up_w[n-tile, chunk].T, so no [M, r] intermediate goes to global memory and
   r up to 1024 never sits in registers at once,
3. adds up_bias and the residual: x[:, n-tile] itself (d_draft == d_target) or
   x @ proj_w[n-tile].T (proj, bias-free), and stores in the output dtype.

Every program recomputes the down-projection of all rows (M x r x d_draft MACs). That is the
price of one launch with no grid-wide sync and no [M, r] round trip through global memory: the
down weight (r x d_draft, <= 8 MiB in bf16 at r = 1024, d = 4096) stays in L2 after the first
program reads it, and there are only cdiv(d_target, BLOCK_N) programs (64 at d = 4096). The up and
proj weights, the bulk of the bytes when r is small, are read exactly once. A split design (one
kernel for GELU(down(LN(x))) over rank tiles, one for up + residual) would read the down weight
once but costs a second launch; at decode sizes the extra L2 reads are the cheaper choice.

Inputs and weights share one dtype (fp32/fp16/bf16); 16-bit operands are rounded to that dtype
before each tl.dot, as the module's own matmuls do; fp32 uses exact ("ieee") dots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from crossspec_kernels.triton._launch import interpreter_serialized

MAX_ROWS = 64
MAX_RANK = 1024
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _bottleneck_adapter_kernel(
    x_ptr,
    norm_w_ptr,
    norm_b_ptr,
    down_w_ptr,
    down_b_ptr,
    up_w_ptr,
    up_b_ptr,
    proj_w_ptr,
    out_ptr,
    stride_xm,
    stride_om,
    stride_dw,
    stride_uw,
    stride_pw,
    num_rows,
    d_in,
    d_out,
    rank,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_NORM_W: tl.constexpr,
    HAS_NORM_B: tl.constexpr,
    HAS_DOWN_B: tl.constexpr,
    HAS_UP_B: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_rows
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < d_out
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    # (1) LayerNorm statistics in fp32: mean, then centred variance.
    total = tl.zeros((BLOCK_M,), tl.float32)
    for k_start in range(0, d_in, BLOCK_K):
        kk = k_start + offs_k
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk < d_in)[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=1)
    mean = total / d_in
    sq = tl.zeros((BLOCK_M,), tl.float32)
    for k_start in range(0, d_in, BLOCK_K):
        kk = k_start + offs_k
        ok = row_ok[:, None] & (kk < d_in)[None, :]
        x = tl.load(x_rows + kk[None, :], mask=ok, other=0.0).to(tl.float32)
        diff = tl.where(ok, x - mean[:, None], 0.0)
        sq += tl.sum(diff * diff, axis=1)
    rstd = 1.0 / tl.sqrt(sq / d_in + eps)

    # (2) rank chunks: GELU(x_norm @ down.T + b) @ up[n-tile].T, accumulated in fp32.
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r_start in range(0, rank, BLOCK_R):
        rr = r_start + offs_r
        r_ok = rr < rank
        h = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for k_start in range(0, d_in, BLOCK_K):
            kk = k_start + offs_k
            k_ok = kk < d_in
            x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if HAS_NORM_W:
                xn = xn * tl.load(norm_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_NORM_B:
                xn = xn + tl.load(norm_b_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            xn = tl.where(k_ok[None, :], xn, 0.0).to(x.dtype)
            w_down = tl.load(  # [BLOCK_K, BLOCK_R] view of down_w [r, d_in]
                down_w_ptr + rr[None, :].to(tl.int64) * stride_dw + kk[:, None],
                mask=r_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            h = tl.dot(xn, w_down, h, input_precision=DOT_PRECISION)
        if HAS_DOWN_B:
            h += tl.load(down_b_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        g = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # exact GELU; GELU(0) = 0
        w_up = tl.load(  # [BLOCK_R, BLOCK_N] view of up_w [d_out, r]
            up_w_ptr + offs_n[None, :].to(tl.int64) * stride_uw + rr[:, None],
            mask=n_ok[None, :] & r_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(g.to(w_up.dtype), w_up, acc, input_precision=DOT_PRECISION)
    if HAS_UP_B:
        acc += tl.load(up_b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    # (3) residual: x itself, or x @ proj[n-tile].T.
    if HAS_PROJ:
        for k_start in range(0, d_in, BLOCK_K):
            kk = k_start + offs_k
            k_ok = kk < d_in
            x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_proj = tl.load(  # [BLOCK_K, BLOCK_N] view of proj_w [d_out, d_in]
                proj_w_ptr + offs_n[None, :].to(tl.int64) * stride_pw + kk[:, None],
                mask=n_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            acc = tl.dot(x, w_proj, acc, input_precision=DOT_PRECISION)
    else:
        x = tl.load(x_rows + offs_n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        acc += x.to(tl.float32)

    out_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(
        out_rows + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :]
    )


class LaunchPlan(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    num_programs: int
    num_warps: int
    num_stages: int


def launch_plan(num_rows: int, d_out: int, rank: int, dtype: torch.dtype) -> LaunchPlan:
    """Tiles (host only; not yet tuned on a GPU)."""
    block_m = max(MIN_BLOCK, triton.next_power_of_2(num_rows))
    if dtype == torch.float32:
        block_n, block_k, block_r = 32, 32, 32  # exact fp32 (FMA) dots: smaller tiles
    else:
        block_n, block_k, block_r = 64, 64, 64
    block_r = min(block_r, max(MIN_BLOCK, triton.next_power_of_2(rank)))
    num_warps = 4 if block_m <= 32 else 8
    return LaunchPlan(block_m, block_n, block_k, block_r, triton.cdiv(d_out, block_n), num_warps, 2)


@interpreter_serialized
def bottleneck_adapter(
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
    """Launcher. Inputs come checked from ops/adapter_projection.py: x [M, d_in] (1 <= M <= 64),
    down [r, d_in], up [d_out, r], proj [d_out, d_in] or None (then d_out == d_in), vectors 1-D,
    everything one dtype and device with unit-stride last dims. Returns [M, d_out] in x's dtype."""
    num_rows, d_in = x.shape
    rank = down_weight.shape[0]
    d_out = up_weight.shape[0]
    if not 1 <= num_rows <= MAX_ROWS:
        raise ValueError(f"triton bottleneck_adapter: M must be in [1, {MAX_ROWS}], got {num_rows}")
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"triton bottleneck_adapter: rank must be in [1, {MAX_RANK}], got {rank}")
    if proj_weight is None and d_out != d_in:
        raise ValueError(
            f"triton bottleneck_adapter: identity residual needs d_out == d_in, got {d_out}, {d_in}"
        )
    matrices = [x, down_weight, up_weight] + ([] if proj_weight is None else [proj_weight])
    if any(t.stride(-1) != 1 for t in matrices):
        raise ValueError("triton bottleneck_adapter: x and weights need a unit-stride last dim")
    vectors = [norm_weight, norm_bias, down_bias, up_bias]
    if any(v is not None and not v.is_contiguous() for v in vectors):
        raise ValueError("triton bottleneck_adapter: norm/bias vectors must be contiguous")

    plan = launch_plan(num_rows, d_out, rank, x.dtype)
    out = torch.empty(num_rows, d_out, dtype=x.dtype, device=x.device)
    _bottleneck_adapter_kernel[(plan.num_programs,)](
        x,
        x if norm_weight is None else norm_weight,
        x if norm_bias is None else norm_bias,
        down_weight,
        x if down_bias is None else down_bias,
        up_weight,
        x if up_bias is None else up_bias,
        x if proj_weight is None else proj_weight,
        out,
        x.stride(0),
        out.stride(0),
        down_weight.stride(0),
        up_weight.stride(0),
        0 if proj_weight is None else proj_weight.stride(0),
        num_rows,
        d_in,
        d_out,
        rank,
        float(eps),
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        BLOCK_R=plan.block_r,
        HAS_NORM_W=norm_weight is not None,
        HAS_NORM_B=norm_bias is not None,
        HAS_DOWN_B=down_bias is not None,
        HAS_UP_B=up_bias is not None,
        HAS_PROJ=proj_weight is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return out
