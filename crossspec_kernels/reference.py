"""PyTorch reference of every op: the spec the CUDA and Triton kernels are tested against.

Written to be read, in fp32 (the kernels accumulate in fp32 too), vectorised over the batch only
where a per-row Python loop would make the statistical tests and the CPU engine too slow.

Randomness is Philox4x32-10 (Salmon et al., SC'11), counter-based, so every backend can regenerate
the same noise for any (request row, node, token) without state. The one layout all backends use:

    key     = (seed & 0xFFFFFFFF, seed >> 32)            seed: per-row uint64 (int64 bits)
    counter = (token >> 2, row << 16 | slot, offset & 0xFFFFFFFF, offset >> 32)
    uniform = ((w >> 9) + 0.5) * 2**-23,  w = output word (token & 3)

``slot`` is a row of ``target_logits`` (0 = root, i + 1 = draft node i); ``token`` is a vocabulary id
for the per-token race noise, or ``ACCEPT_COUNTER`` for the one acceptance uniform of draft node i,
drawn at slot i + 1. One Philox call serves four consecutive tokens (it yields four words), which
quarters the integer work of a race over the vocabulary. The uniform is exact in fp32 and lies
strictly inside (0, 1), so the exponential ``-log(u)`` is finite and positive: a zero-probability
token scores 0 and can never beat a token with positive probability.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
ACCEPT_COUNTER = 0xFFFFFFFF  # token word of an acceptance uniform; never a vocabulary id
MAX_BATCH = (1 << 16) - 1  # row fits the high half of counter word 1; also the grid.y limit
MAX_SLOTS = 1 << 16  # slot (N + 1 logits rows) must fit the low half
MAX_VOCAB = 1 << 30  # token ids (and ids + 3 in the kernels' quads) stay far from int32 overflow


class VerifyOutput(NamedTuple):
    tokens: torch.Tensor  # [B, N+1] int64: accepted draft tokens, then the correction/bonus token
    num_accepted: torch.Tensor  # [B] int64: draft tokens accepted
    path: torch.Tensor  # [B, N] int64: accepted node indices in order


class VerifyBuffers(NamedTuple):
    """Outputs and per-node workspace of the verify kernels (both backends write the same)."""

    tokens: torch.Tensor  # [B, N+1] int64
    num_accepted: torch.Tensor  # [B] int64
    path: torch.Tensor  # [B, N] int64
    next_child: torch.Tensor  # [B, N+1] int32: accepted child of each slot's node, or -1
    emitted: torch.Tensor  # [B, N+1] int64: token emitted if the walk stops at that slot

    @classmethod
    def empty(cls, batch: int, num_nodes: int, device) -> VerifyBuffers:
        def new(shape, dtype=torch.int64):
            return torch.empty(shape, dtype=dtype, device=device)

        slots = (batch, num_nodes + 1)
        return cls(new(slots), new((batch,)), new((batch, num_nodes)), new(slots, torch.int32), new(slots))

    def fill(self, tokens: torch.Tensor, num_accepted: torch.Tensor, path: torch.Tensor) -> VerifyOutput:
        """Copy a result into these buffers and return them as a VerifyOutput."""
        self.tokens.copy_(tokens)
        self.num_accepted.copy_(num_accepted)
        self.path.copy_(path)
        return VerifyOutput(self.tokens, self.num_accepted, self.path)


# ----------------------------------------------------------------------------------------------
# Philox4x32-10
# ----------------------------------------------------------------------------------------------


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values held in int64 tensors.

    b is split in 16-bit halves so every intermediate stays below 2**63.
    """
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    mid = p_hi + (p_lo >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_10(counter, key) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors holding uint32 words: 4 counter, 2 key words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & MASK32 for k in key)
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniform(seed, offset, row, slot, token) -> torch.Tensor:
    """fp32 uniforms in (0, 1) under the counter layout in this module's docstring.

    All arguments are int64 tensors (or ints) that broadcast together.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    offset = torch.as_tensor(offset, dtype=torch.int64)
    token = torch.as_tensor(token, dtype=torch.int64)
    words = philox4x32_10(
        (token >> 2, (torch.as_tensor(row) << 16) | torch.as_tensor(slot), offset, offset >> 32),
        (seed, seed >> 32),
    )
    words = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [..., 4]
    lane = torch.broadcast_to(token & 3, words.shape[:-1])
    return uniform_from_word(words.gather(-1, lane[..., None])[..., 0])


def vocab_uniforms(seed, offset, row, slot, vocab: int) -> torch.Tensor:
    """Uniforms of tokens 0 .. vocab-1, [..., vocab]: philox_uniform computed one Philox call per
    four tokens, as the kernels do. seed, offset, row, slot: [...] int64 tensors."""
    quads = torch.arange((vocab + 3) // 4, device=torch.as_tensor(seed).device)
    seed, offset, row, slot = (
        torch.as_tensor(t, dtype=torch.int64)[..., None] for t in (seed, offset, row, slot)
    )
    words = philox4x32_10((quads, (row << 16) | slot, offset, offset >> 32), (seed, seed >> 32))
    words = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [..., quads, 4]: token order
    return uniform_from_word(words.flatten(-2)[..., :vocab])


def uniform_from_word(word: torch.Tensor) -> torch.Tensor:
    """((w >> 9) + 0.5) * 2**-23: exact in fp32 and strictly inside (0, 1).

    Both ends matter: u = 1 gives -log(u) = 0 (a division by zero in the race) and u = 0 gives an
    infinite exponential (a key of 0 even for a likely token). With 24 bits, + 0.5 would round.
    """
    return ((word >> 9).to(torch.float32) + 0.5) * 2.0**-23


# ----------------------------------------------------------------------------------------------
# Rejection resampling
# ----------------------------------------------------------------------------------------------


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """fp32 copy with NaN read as -inf, so a NaN can never win an argmax or a race."""
    logits = logits.float()
    return torch.where(torch.isnan(logits), float("-inf"), logits)


def sanitize_draft_probs(q: torch.Tensor) -> torch.Tensor:
    """fp32 draft probabilities with every entry that is not finite and > 0 (NaN, inf, 0, negative)
    read as 0: such a token can neither be accepted as a draft nor take mass off the residual."""
    q = q.float()
    return torch.where((q > 0) & (q < float("inf")), q, 0.0)


def softmax_weights(z: torch.Tensor) -> torch.Tensor:
    """Unnormalised softmax weights exp(z - max) along the last dim, defined for every input.

    Rows whose max is +inf put equal weight on their +inf entries; rows with no finite entry
    (all -inf) are uniform. Every row therefore has a positive sum.
    """
    m = z.amax(dim=-1, keepdim=True)
    finite = torch.exp(z - torch.where(torch.isfinite(m), m, 0.0))
    weights = torch.where(m == float("inf"), (z == float("inf")).float(), finite)
    return torch.where(m == float("-inf"), 1.0, weights)


def race(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample index x with probability weights[x] / sum(weights): argmax of weights / Exp(1).

    The exponential race needs no normalisation and no materialised CDF; ties go to the lowest id.
    """
    return torch.argmax(weights / -torch.log(uniforms), dim=-1)


def _per_row(value, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype, device=device).expand(batch).contiguous()


def chain_parents(num_nodes: int, device=None) -> torch.Tensor:
    """Parent array of a chain: node i hangs under node i - 1 (-1 = the root)."""
    return torch.arange(-1, num_nodes - 1, dtype=torch.int64, device=device)


def _first_child_with_token(children, draft_tokens, token) -> torch.Tensor:
    """Lowest-index child whose token equals ``token`` per row, else -1. children: [B, N] bool."""
    match = children & (draft_tokens == token[:, None])
    first = torch.where(match, torch.arange(match.shape[1], device=match.device), match.shape[1])
    first = first.amin(dim=1) if match.shape[1] else torch.zeros_like(token)
    return torch.where(first < match.shape[1], first, -1)


def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.0,
    seed: int | torch.Tensor = 0,
    offset: int | torch.Tensor = 0,
) -> VerifyOutput:
    """Rejection resampling over a draft chain or tree (contract: ARCHITECTURE.md, ``verify``).

    Walks each request's tree from the root. At the current node, with target distribution
    p = softmax(logits / T):

    * greedy rows (T not finite and > 0: 0, negative, NaN or inf): y = argmax(logits); accept the
      lowest-index child whose token is y and descend, else emit y and stop;
    * ``draft_probs`` None: y ~ p by the exponential race; accept a child with token y and descend,
      else emit y and stop;
    * ``draft_probs`` given, q = draft_probs[node] with every entry that is not finite and > 0 read
      as 0: for each child x in index order, if q(x) = 0 the child is rejected and skipped (it could
      not have been drawn from q, so this changes nothing on draws that follow the contract, and no
      draft is ever accepted on the basis of a NaN, infinite, zero or negative q); otherwise accept
      with probability min(1, p(x) / q(x)), and on rejection p <- norm((p - q)+) (kept as is if that
      is all zero); when every child is rejected emit y ~ p (the residual of the children tried).

    Draft tokens outside [0, V) and nodes whose parent is not in [-1, i) are absent: never accepted.
    """
    batch, num_nodes = draft_tokens.shape
    if batch > MAX_BATCH:  # the row must fit its 16 counter bits, or rows would share noise
        raise ValueError(f"verify: batch size must be at most {MAX_BATCH}, got {batch}")
    vocab = target_logits.shape[-1]
    device = target_logits.device
    rows = torch.arange(batch, device=device)
    node_ids = torch.arange(num_nodes, device=device)

    temperature = _per_row(temperature, batch, torch.float32, device)
    seed = _per_row(seed, batch, torch.int64, device)
    offset = _per_row(offset, batch, torch.int64, device)
    draft_tokens = draft_tokens.to(device=device, dtype=torch.int64)
    if parents is None:
        parents = chain_parents(num_nodes, device)
    parents = parents.to(device=device, dtype=torch.int64).expand(batch, num_nodes)

    logits = sanitize_logits(target_logits)
    greedy = ~((temperature > 0) & (temperature < float("inf")))
    safe_temperature = torch.where(greedy, 1.0, temperature)[:, None]
    present = (draft_tokens >= 0) & (draft_tokens < vocab)
    safe_tokens = draft_tokens.clamp(0, vocab - 1)
    # One spare column so a "no child" index (-1 -> N) can be gathered even when N = 0.
    tokens_or_pad = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    # children[b, s, j]: node j is a present child of the node in slot s (node s - 1).
    slot_nodes = torch.arange(-1, num_nodes, device=device)
    children = (
        (parents[:, None, :] == slot_nodes[None, :, None])
        & (node_ids[None, None, :] > slot_nodes[None, :, None])
        & present[:, None, :]
    )

    tokens = torch.full((batch, num_nodes + 1), -1, dtype=torch.int64, device=device)
    path = torch.full((batch, num_nodes), -1, dtype=torch.int64, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    slot = torch.zeros(batch, dtype=torch.int64, device=device)
    walking = torch.ones(batch, dtype=torch.bool, device=device)

    for _ in range(num_nodes + 1):
        kids = children[rows, slot]
        row_logits = logits[rows, slot]
        argmax = torch.argmax(row_logits, dim=-1)
        child = _first_child_with_token(kids, draft_tokens, argmax)
        emitted = argmax
        if not bool(greedy.all()):
            weights = softmax_weights(row_logits / safe_temperature)
            race_noise = vocab_uniforms(seed, offset, rows, slot, vocab)
            if draft_probs is None:
                sample = race(weights, race_noise)
                sampled_child = _first_child_with_token(kids, draft_tokens, sample)
            else:
                q = draft_probs[rows, slot].float()
                sample, sampled_child = _recursive_rejection(
                    weights / weights.sum(-1, keepdim=True),
                    sanitize_draft_probs(q),
                    kids,
                    safe_tokens,
                    race_noise,
                    seed,
                    offset,
                )
            emitted = torch.where(greedy, argmax, sample)
            child = torch.where(greedy, child, sampled_child)

        accept = walking & (child >= 0)
        stop = walking & (child < 0)
        tokens[rows[accept], num_accepted[accept]] = tokens_or_pad[rows, child][accept]
        path[rows[accept], num_accepted[accept]] = child[accept]
        tokens[rows[stop], num_accepted[stop]] = emitted[stop]
        num_accepted += accept.long()
        slot = torch.where(accept, child + 1, slot)
        walking = accept
        if not bool(walking.any()):
            break
    return VerifyOutput(tokens, num_accepted, path)


def _recursive_rejection(p, q, kids, draft_tokens, race_noise, seed, offset):
    """One node of recursive rejection sampling for every row: (emitted token, accepted child or -1).

    p, q: [B, V] target and (sanitised) draft distributions at the node; kids: [B, N] its present
    children. Children are tried in index order; the r-th child of each row is handled in the same
    step. A child with q(x) = 0 is neither accepted nor changes p.
    """
    batch, num_nodes = kids.shape
    rows = torch.arange(batch, device=p.device)
    child = torch.full((batch,), -1, dtype=torch.int64, device=p.device)
    rank = kids.long().cumsum(dim=1)  # rank[b, j] = 1 + number of earlier children of that node
    for r in range(1, int(rank[:, -1].max()) + 1 if num_nodes else 1):
        candidate = torch.where(kids & (rank == r), torch.arange(num_nodes, device=p.device), num_nodes).amin(
            dim=1
        )
        trying = (child < 0) & (candidate < num_nodes)
        safe_candidate = candidate.clamp(max=num_nodes - 1)
        x = draft_tokens[rows, safe_candidate]
        u = philox_uniform(seed, offset, rows, safe_candidate + 1, ACCEPT_COUNTER)
        q_x = q[rows, x]
        trying = trying & (q_x > 0)  # q(x) = 0: x cannot have been drawn from q; skip the child
        accepted = trying & (u * q_x < p[rows, x])
        child = torch.where(accepted, candidate, child)
        residual = (p - q).clamp(min=0)
        mass = residual.sum(dim=-1, keepdim=True)
        rejected = (trying & ~accepted)[:, None] & (mass > 0)
        p = torch.where(rejected, residual / torch.where(mass > 0, mass, 1.0), p)
    return race(p, race_noise), child


# ----------------------------------------------------------------------------------------------
# Tree-masked verification attention
# ----------------------------------------------------------------------------------------------


def tree_visibility(
    batch: int,
    num_queries: int,
    kv_len: int,
    tree_mask: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    device=None,
    *,
    kv_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, Q, L] bool: which kv positions each of the Q new tokens may attend.

    Row b's keys are the positions [kv_start[b], kv_end[b]) (kv_start None: 0, kv_end None: L) and
    its Q new tokens are the last Q of them, positions kv_end[b] - Q .. kv_end[b] - 1. Every
    position before the new tokens (the prefix) is visible to every query; among the new tokens,
    query i sees node j iff tree_mask[b, i, j] (None: causal, j <= i). Positions outside [0, L)
    do not exist, whatever kv_start and kv_end say.
    """
    positions = torch.arange(kv_len, device=device)
    end = kv_len if kv_end is None else torch.as_tensor(kv_end, device=device).reshape(-1, 1, 1)
    if tree_mask is None:
        tree_mask = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).tril()
    tree_mask = tree_mask.to(device=device, dtype=torch.bool).expand(batch, num_queries, num_queries)
    node = positions - (end - num_queries)  # tree node held at each position, < 0 in the prefix
    tree_visible = tree_mask.gather(2, node.clamp(0, num_queries - 1).expand(batch, num_queries, kv_len))
    visible = (positions < end) & ((node < 0) | tree_visible)
    if kv_start is not None:
        start = torch.as_tensor(kv_start, device=device).reshape(-1, 1, 1)
        visible &= positions >= start
    return visible


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    *,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of q [B, Hq, Q, D] over k, v [B, Hkv, L, D] under tree_visibility, in fp32.

    Query head h reads kv head h // (Hq / Hkv) (GQA). A query that sees no position outputs zeros.
    Returns q's dtype.

    Non-finite inputs follow IEEE arithmetic over what a query sees, as the kernels do: a NaN in a
    query, or a NaN/inf in a key or value that the query sees, makes its output NaN; anything at
    a position the query does not see (left padding, other branches, stale slots) never matters.
    """
    batch, q_heads, num_queries, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    keys = k.float().repeat_interleave(group, dim=1)
    values = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale  # [B, Hq, Q, L]
    visible = tree_visibility(batch, num_queries, kv_len, tree_mask, kv_start, q.device, kv_end=kv_end)
    visible = visible[:, None]  # [B, 1, Q, L]
    # Masked scores are -inf whatever the key held (a NaN key must not leak into hidden slots).
    scores = torch.where(visible, scores, float("-inf"))
    probs = torch.where(visible.any(-1, keepdim=True), torch.softmax(scores, dim=-1), 0.0)
    # 0 * NaN is NaN in a matmul: multiply by cleaned values, then poison the queries that see a
    # non-finite value.
    bad = ~torch.isfinite(values).all(-1)  # [B, Hq, L]
    out = probs @ torch.where(bad[..., None], 0.0, values)
    poisoned = (visible & bad[:, :, None, :]).any(-1, keepdim=True)  # [B, Hq, Q, 1]
    return torch.where(poisoned, float("nan"), out).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# KV-cache compaction
# ----------------------------------------------------------------------------------------------


def compact_kv(
    caches: list[torch.Tensor],
    path: torch.Tensor,
    num_accepted: torch.Tensor,
    tree_start: int | torch.Tensor,
) -> None:
    """Move each request's accepted tree slots next to the root, in place, in every cache tensor.

    caches: tensors [B, H, L, D] (keys and values of every layer). The verification step wrote the
    root (the last committed token) at position tree_start[b] and draft node i at tree_start[b] + 1 + i.
    Afterwards positions tree_start[b] + 1 + j, j < num_accepted[b], hold accepted node path[b, j];
    the committed length of row b is tree_start[b] + 1 + num_accepted[b]; later positions are stale.
    """
    batch = path.shape[0]
    start = torch.as_tensor(tree_start, device=path.device).expand(batch)
    for cache in caches:
        for b in range(batch):
            count, first = int(num_accepted[b]), int(start[b]) + 1
            source = first + path[b, :count].to(cache.device)
            cache[b, :, first : first + count] = cache[b, :, source].clone()


# ----------------------------------------------------------------------------------------------
# Fused adapter projection: LM head + log-softmax + top-k
# ----------------------------------------------------------------------------------------------


def lm_head_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k of log softmax(hidden @ weight.T / temperature), in fp32.

    hidden [M, d], weight [V, d] (the target's LM head). Returns (logprobs [M, k] fp32 sorted
    descending, ids [M, k] int64, probs [M, V] fp32 or None). Equal log-probs keep the lower id
    first, so the result is deterministic.
    """
    logits = (hidden.float() @ weight.float().T) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    sorted_logprobs, sorted_ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    probs = torch.softmax(logits, dim=-1) if return_probs else None
    # Copies, not views: a view would keep the whole [M, V] sort alive.
    return sorted_logprobs[:, :k].contiguous(), sorted_ids[:, :k].contiguous(), probs


# ----------------------------------------------------------------------------------------------
# Event rasterization: events_to_frames
# ----------------------------------------------------------------------------------------------

EVENT_REPRESENTATIONS = ("eventgpt", "histogram", "voxel")
# The voxel kernels accumulate in int64 fixed point with this many fractional bits: each event adds
# round(w * 2**24) (its two time weights sum to exactly 2**24), so the sum does not depend on the
# order of the atomics. The fp64 reference below is not quantized; ops/events_to_frames.py
# documents the resulting tolerance.
VOXEL_FIXED_POINT_BITS = 24


def eventgpt_chunk_bounds(num_events: int, num_frames: int) -> list[tuple[int, int]]:
    """[start, end) of each of the num_frames equal-count chunks: i*n // F to (i+1)*n // F."""
    return [(i * num_events // num_frames, (i + 1) * num_events // num_frames) for i in range(num_frames)]


def events_to_frames(
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    p: torch.Tensor,
    *,
    sensor_size: tuple[int, int],
    representation: str = "eventgpt",
    num_frames: int = 5,
    num_bins: int = 5,
    normalize: bool = False,
) -> torch.Tensor:
    """Rasterize events (x, y, t, p: [n] each, in range, t sorted) into one representation.

    eventgpt  uint8 [num_frames, 3, H, W]: chunk i renders events [i*n // F, (i+1)*n // F) on white;
              a pixel with a positive event in the chunk is red, else one with a negative event blue.
    histogram int32 [2, H, W]: channel 0 counts negative events per pixel, channel 1 positive ones.
    voxel     float32 [num_bins, H, W]: DSEC's VoxelGrid, computed in fp64 (see _voxel_grid).
    """
    height, width = sensor_size
    x, y = x.long().cpu(), y.long().cpu()
    positive = (p.cpu() > 0) if p.dtype != torch.bool else p.cpu()
    if representation == "eventgpt":
        frames = torch.full((num_frames, 3, height, width), 255, dtype=torch.uint8)
        for frame, (start, end) in enumerate(eventgpt_chunk_bounds(x.numel(), num_frames)):
            pos = positive[start:end]
            has_positive = torch.zeros(height, width, dtype=torch.bool)
            has_negative = torch.zeros(height, width, dtype=torch.bool)
            has_positive[y[start:end][pos], x[start:end][pos]] = True
            has_negative[y[start:end][~pos], x[start:end][~pos]] = True
            red = has_positive
            blue = has_negative & ~has_positive
            frames[frame, :, red] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None]
            frames[frame, :, blue] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None]
        return frames.to(p.device)
    if representation == "histogram":
        counts = torch.zeros(2 * height * width, dtype=torch.int64)
        counts.index_add_(0, (positive.long() * height + y) * width + x, torch.ones_like(x))
        return counts.view(2, height, width).to(torch.int32).to(p.device)
    if representation == "voxel":
        grid = _voxel_grid(x, y, t.cpu(), positive, num_bins, height, width)
        if normalize:
            grid = _normalize_nonzero(grid)
        return grid.to(torch.float32).to(p.device)
    raise ValueError(
        f"events_to_frames: representation must be one of {EVENT_REPRESENTATIONS}, got {representation!r}"
    )


def _voxel_grid(x, y, t, positive, num_bins: int, height: int, width: int) -> torch.Tensor:
    """DSEC VoxelGrid in fp64: t_norm = (B - 1)(t - t0) / (t_last - t0) (0 when t_last == t0); an
    event of value +1 (positive) or -1 adds value * (1 - frac) to bin floor(t_norm) and value * frac
    to the next bin when it exists. x and y are integers: no spatial interpolation."""
    grid = torch.zeros(num_bins * height * width, dtype=torch.float64)
    if t.numel() == 0:
        return grid.view(num_bins, height, width)
    elapsed = (t - t[0]).double()
    span = float(t[-1] - t[0])
    t_norm = (num_bins - 1) * elapsed / span if span > 0 else torch.zeros_like(elapsed)
    lower_bin = t_norm.floor()
    frac = t_norm - lower_bin
    value = torch.where(positive, 1.0, -1.0).double()
    pixel = y * width + x
    for bin_index, weight in ((lower_bin.long(), 1.0 - frac), (lower_bin.long() + 1, frac)):
        inside = bin_index < num_bins
        grid.index_add_(0, (bin_index * height * width + pixel)[inside], (value * weight)[inside])
    return grid.view(num_bins, height, width)


def _normalize_nonzero(grid: torch.Tensor) -> torch.Tensor:
    """DSEC's normalization: the nonzero entries become (v - mean) / std, mean and (unbiased) std
    over the nonzero entries. Left as is when there are fewer than two nonzero entries or std == 0
    (DSEC subtracts the mean when std == 0; keeping the values keeps the grid informative)."""
    nonzero = grid != 0
    values = grid[nonzero]
    if values.numel() < 2:
        return grid
    mean, std = values.mean(), values.std()
    if not std > 0:
        return grid
    out = grid.clone()
    out[nonzero] = (values - mean) / std
    return out
