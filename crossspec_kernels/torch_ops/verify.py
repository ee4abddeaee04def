"""Rejection resampling as vectorised PyTorch: the ``torch`` backend of ``crossspec_kernels.verify``.

The algorithm of the Triton and CUDA kernels, in tensor ops, with no host sync and no
data-dependent shape or Python branch (so it runs eagerly on CPU or GPU, inside a CUDA graph
capture and under ``torch.compile(fullgraph=True)``):

1. Every (row, slot) decides in parallel what it would do if the walk reached it: the token it
   would emit (greedy argmax, an exponential-race sample, or a sample from the rejection residual)
   and which child it would accept (or none). A node's decision depends only on its own logits row,
   q row and children, never on the path that reached it.
2. The walk follows accepted children from the root. Chains: the accepted path is the prefix of
   accepting slots (a cumulative product). Trees: pointer doubling over "slot -> next slot" gives the
   slot after i steps for every i in ceil(log2(N + 1)) gathers.

Every value is the reference's bit for bit (the softmax weights, the race ``weights / -log(u)``, the
literal residual ``norm((p - q)+)``, the Philox noise in the reference's counter layout), so the
tokens equal ``reference.verify``'s for the same inputs and seed; tests/test_verify_torch.py checks.

Cost: O(B·(N+1)·V) per decision pass. Recursive rejection over a tree tries the children of all
nodes rank by rank, N ranks at most (one for a chain); rank r only touches the N - r slots that can
have that many children, so a sampled tree with draft_probs costs about N/2 residual passes over
the vocabulary (chains: one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from crossspec_kernels.reference import (
    ACCEPT_COUNTER,
    MASK32,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    VerifyBuffers,
    VerifyOutput,
    sanitize_draft_probs,
)

_INF = float("inf")


# ----------------------------------------------------------------------------------------------
# Philox4x32-10 (the layout in reference.py's docstring)
# ----------------------------------------------------------------------------------------------


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors holding uint32 words.

    The 32 x 32-bit products are formed directly in int64. They can pass 2**63 and wrap, but
    two's-complement wrapping keeps all 64 product bits (every PyTorch device multiplies int64
    modulo 2**64), so the high word is (prod >> 32) & MASK32 and the low word prod & MASK32: a
    third of the integer ops of the reference's 16-bit split, bit for bit the same words.

    Words that vary along few dims stay broadcast (cheap) for the first rounds; once all four have
    the full shape, each round works in place (the words are then this function's own tensors),
    which on CPU is about three times faster than allocating every intermediate.
    """
    shape = torch.broadcast_shapes(*(torch.as_tensor(c).shape for c in (c0, c1, c2, c3, k0, k1)))
    for round_index in range(PHILOX_ROUNDS):
        key0 = k0 + round_index * PHILOX_W0  # reduced mod 2**32 by the masks below
        key1 = k1 + round_index * PHILOX_W1
        # The new c1, c3 (low words) keep their high bits: they only enter the next round through
        # an xor whose result is masked.
        if round_index > 0 and all(c.shape == shape for c in (c0, c1, c2, c3)):
            prod0, prod1 = c0.mul_(PHILOX_M0), c2.mul_(PHILOX_M1)
            c0 = c1.bitwise_xor_(key0).bitwise_xor_(prod1 >> 32).bitwise_and_(MASK32)
            c2 = c3.bitwise_xor_(key1).bitwise_xor_(prod0 >> 32).bitwise_and_(MASK32)
            c1, c3 = prod1, prod0
        else:
            prod0, prod1 = c0 * PHILOX_M0, c2 * PHILOX_M1
            c0, c1, c2, c3 = (
                ((prod1 >> 32) ^ c1 ^ key0) & MASK32,
                prod1,
                ((prod0 >> 32) ^ c3 ^ key1) & MASK32,
                prod0,
            )
    return c0, c1 & MASK32, c2, c3 & MASK32


def race_noise(
    seed: torch.Tensor, offset: torch.Tensor, slots: int, vocab: int, *, accept: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exponentials -log(u) of every (row, slot, token), [B, slots, vocab] fp32, and when ``accept``
    the acceptance uniforms of every slot, [B, slots] (draft node j's is at slot j + 1), else None.

    seed, offset: [B] int64 (uint64 bits). u is ``reference.vocab_uniforms`` (one Philox call per
    4 tokens); the acceptance uniform (token ACCEPT_COUNTER) rides along as one extra quad, so both
    come from one Philox pass.
    """
    batch = seed.shape[0]
    device = seed.device
    rows = torch.arange(batch, device=device)[:, None, None]
    slot_ids = torch.arange(slots, device=device)[None, :, None]
    quads = torch.arange((vocab + 3) // 4, device=device)
    if accept:
        quads = F.pad(quads, (0, 1), value=ACCEPT_COUNTER >> 2)
    k0, k1 = seed[:, None, None] & MASK32, (seed[:, None, None] >> 32) & MASK32
    offset = offset[:, None, None]
    words = philox4x32_10(quads, (rows << 16) | slot_ids, offset & MASK32, (offset >> 32) & MASK32, k0, k1)
    words = torch.stack(torch.broadcast_tensors(*words), dim=-1).flatten(-2)  # [B, slots, 4 * quads]
    # reference.uniform_from_word, with the float ops in place
    uniforms = (words >> 9).to(torch.float32).add_(0.5).mul_(2.0**-23)
    accept_u = uniforms[..., -4 + (ACCEPT_COUNTER & 3)] if accept else None
    return uniforms[..., :vocab].log_().neg_(), accept_u


def softmax_weights(z: torch.Tensor) -> torch.Tensor:
    """``reference.softmax_weights`` bit for bit, in three passes over z instead of seven.

    With m the row max: finite rows give exp(z - m) directly. Rows with m = +inf give z - m = NaN
    at their +inf entries and -inf elsewhere; rows with m = -inf give NaN everywhere; so exp, then
    NaN -> 1, is the reference's 1 on the +inf entries (0 elsewhere) and its uniform 1 for rows
    with nothing finite. z must be NaN-free (sanitised logits).
    """
    return torch.exp_(z - z.amax(dim=-1, keepdim=True)).nan_to_num_(nan=1.0, posinf=_INF)


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------


class _Tree:
    """Which draft nodes hang under which slot, as index tensors (shapes only depend on B and N)."""

    def __init__(self, draft_tokens: torch.Tensor, parents: torch.Tensor | None, vocab: int) -> None:
        batch, num_nodes = draft_tokens.shape
        device = draft_tokens.device
        self.chain = parents is None
        self.num_nodes = num_nodes
        self.node_ids = torch.arange(num_nodes, device=device)
        self.draft_tokens = draft_tokens
        # Absent nodes (ids outside [0, V), or a parent not in [-1, i)) are never anyone's child.
        valid = (draft_tokens >= 0) & (draft_tokens < vocab)
        if parents is not None:
            parents = parents.expand(batch, num_nodes)
            valid = valid & (parents >= -1) & (parents < self.node_ids)
            self.parent_slot = (parents + 1).clamp(0, num_nodes)  # slot whose children node j is among
        self.valid = valid

    def first_child_with_token(self, token: torch.Tensor) -> torch.Tensor:
        """[B, N+1]: lowest-index present child of each slot whose draft token is token[b, slot], or -1."""
        num_nodes = self.num_nodes
        if self.chain:
            match = self.valid & (self.draft_tokens == token[:, :num_nodes])
            return F.pad(torch.where(match, self.node_ids, -1), (0, 1), value=-1)
        match = self.valid & (self.draft_tokens == token.gather(1, self.parent_slot))
        candidate = torch.where(match, self.node_ids, num_nodes)  # num_nodes = no match
        first = torch.full_like(token, num_nodes).scatter_reduce(
            1, self.parent_slot, candidate, "amin", include_self=True
        )
        return torch.where(first < num_nodes, first, -1)

    def children_by_rank(self) -> torch.Tensor:
        """[B, N+1, R]: the r-th present child (index order) of each slot, or -1; R = 1 for chains."""
        batch, num_nodes = self.draft_tokens.shape
        if self.chain:
            return F.pad(torch.where(self.valid, self.node_ids, -1), (0, 1), value=-1)[:, :, None]
        slots = num_nodes + 1
        earlier = self.node_ids[None, :] < self.node_ids[:, None]  # [j, i]: i < j
        siblings = (self.parent_slot[:, :, None] == self.parent_slot[:, None, :]) & self.valid[:, None, :]
        rank = (siblings & earlier).sum(-1)  # [B, N]: earlier present siblings
        # Present node j goes to (parent_slot, rank); absent nodes to a private spare column, so
        # every scattered index is distinct (deterministic everywhere).
        index = torch.where(
            self.valid, self.parent_slot * num_nodes + rank, slots * num_nodes + self.node_ids
        )
        table = torch.full((batch, slots * num_nodes + num_nodes), -1, dtype=torch.int64, device=index.device)
        table.scatter_(1, index, self.node_ids.expand(batch, num_nodes))
        return table[:, : slots * num_nodes].view(batch, slots, num_nodes)


_MIN_CHUNKED_ARGMAX = 2048


def _argmax_chunk(length: int) -> int:
    """A chunk width near 512 that divides ``length`` (no padding copy), else 512."""
    for width in range(512, 1025):
        if length % width == 0:
            return width
    for width in range(511, 255, -1):
        if length % width == 0:
            return width
    return 512


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dim (ties to the lowest index) of a NaN-free tensor.

    On CPU, torch.argmax streams a row an order of magnitude slower than amax does, so long rows
    take the first chunk that holds the row maximum (one amax pass) and the argmax of that chunk.
    Exact: comparisons only, so the index is the one torch.argmax returns.
    """
    length = x.shape[-1]
    if x.device.type != "cpu" or length < _MIN_CHUNKED_ARGMAX:
        return x.argmax(dim=-1)
    width = _argmax_chunk(length)
    chunks = -(-length // width)
    if chunks * width != length:
        x = F.pad(x, (0, chunks * width - length), value=-_INF)  # pads never win: they come last
    tiles = x.reshape(*x.shape[:-1], chunks, width)
    chunk_max = tiles.amax(dim=-1)
    first_chunk = (chunk_max == chunk_max.amax(dim=-1, keepdim=True)).to(torch.uint8).argmax(dim=-1)
    index = first_chunk[..., None, None].expand(*first_chunk.shape, 1, width)
    return first_chunk * width + tiles.gather(-2, index)[..., 0, :].argmax(dim=-1)


def _race(weights: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """``reference.race``: argmax of weights / Exp(1)."""
    return _argmax(weights / exponentials)


def _recursive_rejection(
    tree: _Tree, p: torch.Tensor, q: torch.Tensor, accept_u: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(emitted [B, N+1], accepted child [B, N+1] or -1) of every slot, children tried in index order.

    p, q: [B, N+1, V] target and (sanitised) draft distributions. A child x with q(x) = 0 (q not
    finite or not > 0) cannot have been drawn from q: it is never accepted and leaves the residual
    as it is. Otherwise it is accepted with probability min(1, p(x) / q(x)) and on rejection
    p <- norm((p - q)+) (kept when that is all zero).
    """
    num_nodes = tree.num_nodes
    by_rank = tree.children_by_rank()
    safe_tokens = tree.draft_tokens.clamp(0, p.shape[-1] - 1)
    child = torch.full(p.shape[:2], -1, dtype=torch.int64, device=p.device)
    for rank in range(by_rank.shape[2]):
        live = num_nodes - rank  # slots 0 .. N - rank - 1 can have a child of this rank
        candidate = by_rank[:, :live, rank]
        p_live, q_live = p[:, :live], q[:, :live]
        safe_candidate = candidate.clamp(min=0)
        x = safe_tokens.gather(1, safe_candidate)[..., None]
        p_x = p_live.gather(2, x)[..., 0]
        q_x = q_live.gather(2, x)[..., 0]
        u = accept_u.gather(1, safe_candidate)
        trying = (child[:, :live] < 0) & (candidate >= 0) & (q_x > 0)
        accepted = trying & (u * q_x < p_x)
        child[:, :live] = torch.where(accepted, candidate, child[:, :live])
        residual = (p_live - q_live).clamp(min=0)
        mass = residual.sum(dim=-1, keepdim=True)
        rejected = (trying & ~accepted)[..., None] & (mass > 0)
        p[:, :live] = torch.where(rejected, residual / torch.where(mass > 0, mass, 1.0), p_live)
    return _race(p, noise), child


def _walk(tree: _Tree, next_child: torch.Tensor, emitted: torch.Tensor):
    """Follow accepted children from the root: (tokens [B, N+1], num_accepted [B], path [B, N])."""
    batch, slots = next_child.shape
    num_nodes = slots - 1
    if tree.chain:  # slot i's child is node i: the path is the prefix of accepting slots
        on_path = (next_child[:, :num_nodes] >= 0).cumprod(dim=1).bool()
        num_accepted = on_path.sum(dim=1)
        path = torch.where(on_path, tree.node_ids, -1)
        accepted_tokens = torch.where(on_path, tree.draft_tokens, -1)
        last_slot = num_accepted
    else:  # pointer doubling: visited[:, i] = slot after i steps, for i = 0 .. N
        step = torch.where(next_child >= 0, next_child + 1, torch.arange(slots, device=next_child.device))
        visited = torch.zeros(batch, 1, dtype=torch.int64, device=next_child.device)
        levels = math.ceil(math.log2(slots)) if slots > 1 else 0
        for level in range(levels):
            visited = torch.cat([visited, step.gather(1, visited)], dim=1)
            if level + 1 < levels:
                step = step.gather(1, step)
        visited = visited[:, :slots]
        on_path = visited[:, 1:] != visited[:, :-1]  # slots only grow along the path, then stay
        num_accepted = on_path.sum(dim=1)
        path = torch.where(on_path, visited[:, 1:] - 1, -1)
        accepted_tokens = torch.where(on_path, tree.draft_tokens.gather(1, path.clamp(min=0)), -1)
        last_slot = visited[:, num_nodes]
    bonus = emitted.gather(1, last_slot[:, None])
    columns = torch.arange(slots, device=next_child.device)
    tokens = torch.where(columns == num_accepted[:, None], bonus, F.pad(accepted_tokens, (0, 1), value=-1))
    return tokens, num_accepted, path


def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor | None,
    seed: torch.Tensor | None,
    offset: torch.Tensor | None,
    *,
    out: VerifyBuffers | None = None,
) -> VerifyOutput:
    """Rejection resampling, same contract and tokens as ``reference.verify``; no host sync.

    Inputs come checked and normalised from ops/verify.py: target_logits [B, N+1, V] (any float
    dtype and strides), draft_tokens [B, N] int64, parents [B, N] / [N] int64 or None (a chain: the
    cheaper walk), draft_probs [B, N+1, V] or None. temperature: [B] fp32, or None when every row is
    greedy (then seed and offset are not read and no noise is computed); rows whose temperature is
    not finite and > 0 are greedy. seed, offset: [B] int64.

    ``out``: when given, the results are written into out.tokens / out.num_accepted / out.path and
    those tensors are returned (out.next_child and out.emitted, the kernels' workspace, are not
    used). Returns VerifyOutput(tokens [B, N+1], num_accepted [B], path [B, N]), int64, -1 padded.
    """
    _, slots, vocab = target_logits.shape
    tree = _Tree(draft_tokens, parents, vocab)
    logits = torch.nan_to_num(target_logits.float(), nan=-_INF, posinf=_INF, neginf=-_INF)
    argmax = _argmax(logits)  # [B, N+1]; ties (and all -inf rows) go to the lowest id

    if temperature is None:
        emitted = argmax
        next_child = tree.first_child_with_token(argmax)
    else:
        greedy = ~((temperature > 0) & (temperature < _INF))[:, None]
        safe_temperature = torch.where(greedy, 1.0, temperature[:, None])
        weights = softmax_weights(logits / safe_temperature[..., None])
        noise, accept_u = race_noise(seed, offset, slots, vocab, accept=draft_probs is not None)
        if draft_probs is None:
            emitted = torch.where(greedy, argmax, _race(weights, noise))
            next_child = tree.first_child_with_token(emitted)
        else:
            q = sanitize_draft_probs(draft_probs)
            p = weights / weights.sum(dim=-1, keepdim=True)
            sample, sampled_child = _recursive_rejection(tree, p, q, accept_u[:, 1:], noise)
            emitted = torch.where(greedy, argmax, sample)
            next_child = torch.where(greedy, tree.first_child_with_token(argmax), sampled_child)

    tokens, num_accepted, path = _walk(tree, next_child, emitted)
    return VerifyOutput(tokens, num_accepted, path) if out is None else out.fill(tokens, num_accepted, path)
