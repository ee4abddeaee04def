"""Triton kernels for rejection resampling (crossspec_kernels.verify).

Two launches, no host syncs:

1. ``_verify_nodes_kernel``, one program per (draft slot, request): every decision a node can make
   depends only on that node (its logits row, its q row, its children), never on the path that
   reached it. So all B·(N+1) nodes decide in parallel (which child is accepted, else which token
   is emitted) and each logits row is streamed from memory once, whatever the acceptance pattern.
2. ``_verify_walk_kernel``: each request follows the accepted children from the root, O(depth).

Recursive rejection with several i.i.d. children keeps no residual vector. After rejecting i
children of a node, the residual is p_i = (p - A_i q)+ / S_i with A_0 = 0, S_0 = 1 and, on each
rejection, A <- A + S, S <- sum((p - A q)+) (unchanged if that sum is 0); a child with q(x) = 0
(q read as 0 where it is not finite and > 0) could not have been drawn from q and is skipped, neither
accepted nor counted as a rejection. This closed form equals
the literal p <- norm((p - q)+) recursion of the reference, so a node needs two scalars and one
extra pass over the vocabulary per rejected child. Samples come from the exponential race
argmax r(x) / E(x), E ~ Exp(1) from Philox, which needs no normalisation and no CDF.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from crossspec_kernels.reference import (
    ACCEPT_COUNTER,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    VerifyBuffers,
)
from crossspec_kernels.triton._launch import interpreter_serialized

# Triton kernels may only read module globals that are constexpr.
_ACCEPT_COUNTER = tl.constexpr(ACCEPT_COUNTER)
_M0 = tl.constexpr(PHILOX_M0)
_M1 = tl.constexpr(PHILOX_M1)
_W0 = tl.constexpr(PHILOX_W0)
_W1 = tl.constexpr(PHILOX_W1)
_ROUNDS = tl.constexpr(PHILOX_ROUNDS)

_MAX_BLOCK_V = 2048
_BLOCK_N = 128
_BLOCK_ROWS = 64


@triton.jit
def _philox_words(seed, offset, row, slot, counter0):
    """Philox4x32-10 of (counter0, row << 16 | slot, offset) under key seed: four uint32 words."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = counter0
    c1 = ((row << 16) | slot).to(tl.uint32) + tl.zeros_like(c0)
    c2 = (offset & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(c0)
    c3 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(c0)
    for round_index in tl.static_range(_ROUNDS):
        if round_index > 0:
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _to_uniform(word):
    return ((word >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23: exact, in (0, 1)


@triton.jit
def _philox_uniform(seed, offset, row, slot, token):
    """Uniform in (0, 1) for uint32 ``token`` (scalar or tensor): the layout in reference.py."""
    w0, w1, w2, w3 = _philox_words(seed, offset, row, slot, token >> 2)
    lane = token & 3
    return _to_uniform(tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3))))


@triton.jit
def _race_uniforms(seed, offset, row, slot, start, BLOCK_V: tl.constexpr):
    """Uniforms of tokens start .. start + BLOCK_V (start % 4 == 0): one Philox call per 4 tokens."""
    quads = (start // 4 + tl.arange(0, BLOCK_V // 4)).to(tl.uint32)
    w0, w1, w2, w3 = _philox_words(seed, offset, row, slot, quads)
    # join(join(w0, w2), join(w1, w3))[q, i, j] = word 2i + j, so the row-major flattening is
    # w0, w1, w2, w3 of quad 0, then quad 1, ...: token order.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_V,))
    return _to_uniform(words)


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    # libdevice's expf/logf are what CUDA C++ calls, so the triton and cuda backends round alike;
    # the CPU interpreter has no libdevice and uses numpy's.
    if PRECISE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _div(x, y):
    # IEEE round-to-nearest, as torch and CUDA C++ divide; Triton's default '/' is approximate.
    return tl.math.div_rn(x, y)


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log(x)
    return tl.log(x)


@triton.jit
def _sanitized_logits(row_ptr, offs, vocab):
    """fp32 logits for one tile; NaN reads as -inf, and so do lanes past V."""
    logits = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    return tl.where(logits != logits, float("-inf"), logits)


@triton.jit
def _scaled_logits(row_ptr, offs, vocab, temperature):
    return _div(_sanitized_logits(row_ptr, offs, vocab), temperature)


@triton.jit
def _softmax_weights(z, z_max, in_range, PRECISE: tl.constexpr):
    """exp(z - max), with +inf maxima and all -inf rows handled as in reference.softmax_weights."""
    weights = tl.where(
        z_max == float("inf"),
        tl.where(z == float("inf"), 1.0, 0.0),
        tl.where(z_max == float("-inf"), 1.0, _exp(z - z_max, PRECISE)),
    )
    return tl.where(in_range, weights, 0.0)


@triton.jit
def _row_max(row_ptr, vocab, temperature, BLOCK_V: tl.constexpr):
    running = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        running = tl.maximum(running, _scaled_logits(row_ptr, offs, vocab, temperature))
    return tl.max(running, axis=0)


@triton.jit
def _race_update(keys, start, best_key, best_id):
    """Fold one tile into a running argmax; ties keep the lowest id (earlier tiles win)."""
    tile_key, tile_id = tl.max(keys, axis=0, return_indices=True, return_indices_tie_break_left=True)
    better = tile_key > best_key
    return tl.where(better, tile_key, best_key), tl.where(better, start + tile_id, best_id)


@triton.jit
def _draft_prob(q):
    """q in fp32 with every value that is not finite and > 0 (NaN, inf, negative) read as 0."""
    q = q.to(tl.float32)
    return tl.where((q > 0) & (q < float("inf")), q, 0.0)


@triton.jit
def _first_child(
    tokens_row,
    parents_row,
    num_nodes,
    vocab,
    node,
    after,
    want_token,
    MATCH_TOKEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Lowest node j > after hanging under ``node`` with a present token (== want_token if asked).

    Returns num_nodes when there is none.
    """
    best = num_nodes
    for start in range(0, num_nodes, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        in_range = j < num_nodes
        parent = tl.load(parents_row + j, mask=in_range, other=-2)
        token = tl.load(tokens_row + j, mask=in_range, other=-1)
        ok = in_range & (parent == node) & (j > after) & (token >= 0) & (token < vocab)
        if MATCH_TOKEN:
            ok = ok & (token == want_token)
        best = tl.minimum(best, tl.min(tl.where(ok, j, num_nodes), axis=0))
    return best


@triton.jit
def _verify_nodes_kernel(
    logits_ptr,
    stride_logits_batch,
    stride_logits_slot,
    probs_ptr,
    stride_probs_batch,
    stride_probs_slot,
    draft_tokens_ptr,
    parents_ptr,
    temperature_ptr,
    seed_ptr,
    offset_ptr,
    next_child_ptr,
    emitted_ptr,
    num_nodes,
    vocab,
    HAS_PROBS: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    slot = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    node = slot - 1
    tokens_row = draft_tokens_ptr + row * num_nodes
    parents_row = parents_ptr + row * num_nodes
    logits_row = logits_ptr + row * stride_logits_batch + slot.to(tl.int64) * stride_logits_slot
    own_token = tl.load(tokens_row + node, mask=slot > 0, other=0)
    temperature = tl.load(temperature_ptr + row)

    child = num_nodes  # num_nodes = no child accepted
    emitted = -1
    if (own_token >= 0) & (own_token < vocab):  # absent nodes decide nothing
        if (temperature > 0) & (temperature < float("inf")):  # else greedy (0, NaN, inf)
            z_max = _row_max(logits_row, vocab, temperature, BLOCK_V)
            seed = tl.load(seed_ptr + row)
            offset = tl.load(offset_ptr + row)
            if HAS_PROBS:
                probs_row = probs_ptr + row * stride_probs_batch + slot.to(tl.int64) * stride_probs_slot
                mass = tl.zeros((BLOCK_V,), tl.float32)
                for start in range(0, vocab, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    z = _scaled_logits(logits_row, offs, vocab, temperature)
                    mass += _softmax_weights(z, z_max, offs < vocab, PRECISE)
                total = tl.sum(mass, axis=0)
                # Residual after the rejections so far: (p - shift * q)+ / scale.
                shift = 0.0
                scale = 1.0
                candidate = _first_child(
                    tokens_row, parents_row, num_nodes, vocab, node, node, 0, False, BLOCK_N
                )
                while candidate < num_nodes:
                    x = tl.load(tokens_row + candidate)
                    z_x = _scaled_logits(logits_row, x, vocab, temperature)
                    p_x = _div(_softmax_weights(z_x, z_max, True, PRECISE), total)
                    q_x = _draft_prob(tl.load(probs_row + x))
                    residual_x = _div(tl.maximum(p_x - shift * q_x, 0.0), scale)
                    u = _philox_uniform(
                        seed, offset, row, candidate + 1, tl.full((), _ACCEPT_COUNTER, tl.uint32)
                    )
                    if (q_x > 0) & (u * q_x < residual_x):
                        child = candidate
                        candidate = num_nodes
                    elif q_x == 0:  # x cannot have been drawn from q: skip it, keep the residual
                        candidate = _first_child(
                            tokens_row, parents_row, num_nodes, vocab, node, candidate, 0, False, BLOCK_N
                        )
                    else:
                        next_shift = shift + scale
                        next_mass = tl.zeros((BLOCK_V,), tl.float32)
                        for start in range(0, vocab, BLOCK_V):
                            offs = start + tl.arange(0, BLOCK_V)
                            in_range = offs < vocab
                            p = _softmax_weights(
                                _scaled_logits(logits_row, offs, vocab, temperature), z_max, in_range, PRECISE
                            )
                            q = _draft_prob(tl.load(probs_row + offs, mask=in_range, other=0.0))
                            next_mass += tl.maximum(_div(p, total) - next_shift * q, 0.0)
                        next_total = tl.sum(next_mass, axis=0)
                        if next_total > 0:
                            shift = next_shift
                            scale = next_total
                        candidate = _first_child(
                            tokens_row, parents_row, num_nodes, vocab, node, candidate, 0, False, BLOCK_N
                        )
                if child == num_nodes:
                    best_key = tl.full((), -1.0, tl.float32)
                    best_id = tl.full((), 0, tl.int32)
                    for start in range(0, vocab, BLOCK_V):
                        offs = start + tl.arange(0, BLOCK_V)
                        in_range = offs < vocab
                        p = _softmax_weights(
                            _scaled_logits(logits_row, offs, vocab, temperature), z_max, in_range, PRECISE
                        )
                        q = _draft_prob(tl.load(probs_row + offs, mask=in_range, other=0.0))
                        residual = tl.maximum(_div(p, total) - shift * q, 0.0)
                        noise = _race_uniforms(seed, offset, row, slot, start, BLOCK_V)
                        keys = tl.where(in_range, _div(residual, -_log(noise, PRECISE)), -1.0)
                        best_key, best_id = _race_update(keys, start, best_key, best_id)
                    emitted = best_id
            else:
                best_key = tl.full((), -1.0, tl.float32)
                best_id = tl.full((), 0, tl.int32)
                for start in range(0, vocab, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    in_range = offs < vocab
                    weights = _softmax_weights(
                        _scaled_logits(logits_row, offs, vocab, temperature), z_max, in_range, PRECISE
                    )
                    noise = _race_uniforms(seed, offset, row, slot, start, BLOCK_V)
                    keys = tl.where(in_range, _div(weights, -_log(noise, PRECISE)), -1.0)
                    best_key, best_id = _race_update(keys, start, best_key, best_id)
                emitted = best_id
                child = _first_child(
                    tokens_row, parents_row, num_nodes, vocab, node, node, emitted, True, BLOCK_N
                )
        else:
            best_logit = tl.full((), float("-inf"), tl.float32)
            best_id = tl.full((), 0, tl.int32)
            for start in range(0, vocab, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                best_logit, best_id = _race_update(
                    _sanitized_logits(logits_row, offs, vocab), start, best_logit, best_id
                )
            emitted = best_id
            child = _first_child(
                tokens_row, parents_row, num_nodes, vocab, node, node, emitted, True, BLOCK_N
            )

    out = row * (num_nodes + 1) + slot
    tl.store(next_child_ptr + out, tl.where(child < num_nodes, child, -1).to(tl.int32))
    tl.store(emitted_ptr + out, emitted.to(tl.int64))


@triton.jit
def _verify_walk_kernel(
    next_child_ptr,
    emitted_ptr,
    draft_tokens_ptr,
    tokens_ptr,
    num_accepted_ptr,
    path_ptr,
    batch,
    num_nodes,
    BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = rows < batch
    slots = num_nodes + 1
    slot = tl.zeros((BLOCK_ROWS,), tl.int64)
    count = tl.zeros((BLOCK_ROWS,), tl.int64)
    walking = live
    for _ in range(num_nodes):  # a child's index exceeds its parent's: at most N steps
        child = tl.load(next_child_ptr + rows * slots + slot, mask=walking, other=-1).to(tl.int64)
        accept = walking & (child >= 0)
        token = tl.load(draft_tokens_ptr + rows * num_nodes + child, mask=accept, other=-1)
        tl.store(tokens_ptr + rows * slots + count, token, mask=accept)
        tl.store(path_ptr + rows * num_nodes + count, child, mask=accept)
        count += accept.to(tl.int64)
        slot = tl.where(accept, child + 1, slot)
        walking = accept
    emitted = tl.load(emitted_ptr + rows * slots + slot, mask=live, other=-1)
    tl.store(tokens_ptr + rows * slots + count, emitted, mask=live)
    tl.store(num_accepted_ptr + rows, count, mask=live)
    # Padding goes to addresses the walk never wrote, so no store ordering is relied upon.
    for column in range(slots):
        tl.store(
            tokens_ptr + rows * slots + column,
            tl.full((BLOCK_ROWS,), -1, tl.int64),
            mask=live & (column > count),
        )
        tl.store(
            path_ptr + rows * num_nodes + column,
            tl.full((BLOCK_ROWS,), -1, tl.int64),
            mask=live & (column >= count) & (column < num_nodes),
        )


@interpreter_serialized
def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    *,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    buffers: VerifyBuffers,
) -> None:
    """Launcher; writes ``buffers``. Inputs come checked and normalised from ops/verify.py:
    draft_tokens and parents [B, N] int64 contiguous, temperature/seed/offset [B], logits and probs
    with a unit-stride vocabulary dim."""
    batch, num_nodes = draft_tokens.shape
    vocab = target_logits.shape[2]
    if target_logits.stride(2) != 1 or (draft_probs is not None and draft_probs.stride(2) != 1):
        raise ValueError("triton verify: target_logits and draft_probs need a unit-stride vocabulary dim")

    has_probs = draft_probs is not None
    probs = draft_probs if has_probs else target_logits  # never read when HAS_PROBS is False
    block_v = max(16, min(_MAX_BLOCK_V, triton.next_power_of_2(vocab)))  # a multiple of 4
    _verify_nodes_kernel[(num_nodes + 1, batch)](
        target_logits,
        target_logits.stride(0),
        target_logits.stride(1),
        probs,
        probs.stride(0),
        probs.stride(1),
        draft_tokens,
        parents,
        temperature,
        seed,
        offset,
        buffers.next_child,
        buffers.emitted,
        num_nodes,
        vocab,
        HAS_PROBS=has_probs,
        PRECISE=target_logits.is_cuda,
        BLOCK_V=block_v,
        BLOCK_N=_BLOCK_N,
        num_warps=8 if block_v >= 1024 else 4,
    )
    _verify_walk_kernel[(triton.cdiv(batch, _BLOCK_ROWS),)](
        buffers.next_child,
        buffers.emitted,
        draft_tokens,
        buffers.tokens,
        buffers.num_accepted,
        buffers.path,
        batch,
        num_nodes,
        BLOCK_ROWS=_BLOCK_ROWS,
    )
