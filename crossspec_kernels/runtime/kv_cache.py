"""SlotCache: a preallocated Hugging Face KV cache in which every row has its own length.

Speculative rounds commit a different number of tokens per row. An appending cache (HF's
``DynamicCache``) gives every row the same number of slots per forward, so rows that accepted
less keep masked holes, and every forward copies the whole cache (``torch.cat``). Here each layer
owns fixed buffers [B, Hkv, capacity, D] and each row b its length ``lengths[b]``: a forward of W
new tokens writes row b's keys and values at slots ``lengths[b] .. lengths[b] + W - 1``, and
committing is setting the lengths (a draft that was not accepted is simply overwritten later).
Rows never hold holes, addresses never change (CUDA graphs, ``torch.compile``), and nothing is
copied per step.

Row b's slots: ``[0, kv_start[b])`` left padding of the prompt (never visible), then its tokens.
The RoPE position of slot s is ``s - kv_start[b]``, so positions count real tokens only, as
``generate`` derives them from the attention mask.

The host keeps a copy of the lengths (``host_lengths``): the engine learns every round's counts in
its one device-to-host read, so the host side never needs another. Eager forwards use it to
attend to the used slots only (``kv_limit``); static (compiled, graphed) forwards attend to the
whole capacity under a mask, so that their shapes never change.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from crossspec_kernels.hf_attention import AttentionPlan
from crossspec_kernels.ops.tree_attention import pack_tree_mask


class _SlotLayer(CacheLayerMixin):
    """One layer's buffers; the slots to write come from the owning cache (shared by all layers)."""

    is_compileable = False  # keeps transformers' own mask code on its cheap path (masks are ours)
    is_sliding = False

    def __init__(self, owner: SlotCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.owner = owner
        self.keys, self.values = keys, values
        self.is_initialized = True

    def lazy_initialization(self, *args, **kwargs) -> None:  # buffers exist from the start
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.owner.write(self.keys, key_states)
        self.owner.write(self.values, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        # transformers 5.x passes the query length, 4.57 the cache positions.
        width = query if isinstance(query, int) else query.shape[0]
        return self.owner.max_length + width, 0

    def get_seq_length(self) -> int:
        return self.owner.max_length

    def get_max_cache_shape(self) -> int:
        return self.owner.capacity

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """Per-row-length KV cache of an HF decoder (the language model of a VLM included).

    Args:
        config: the decoder's config (``num_hidden_layers``, ``num_key_value_heads``, head dim).
        batch: rows B; capacity: slots per row.
    """

    def __init__(self, config, batch: int, capacity: int, dtype, device) -> None:
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, heads, capacity, head_dim)
        self.batch, self.capacity, self.dtype, self.device = batch, capacity, dtype, torch.device(device)
        layers = [
            _SlotLayer(
                self,
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        long = dict(dtype=torch.int64, device=device)
        self.lengths = torch.zeros(batch, **long)
        self.kv_start = torch.zeros(batch, **long)
        self.host_lengths = [0] * batch
        # Slots the next forward writes: the first W columns (one buffer: its address is fixed).
        self._slots = torch.zeros(batch, capacity, **long)
        self._uniform = True  # all rows write the same slots: index_copy_ instead of scatter_
        self._has_padding = False
        self._steps = torch.arange(capacity, **long)

    @property
    def max_length(self) -> int:
        return max(self.host_lengths)

    def tensors(self) -> list[torch.Tensor]:
        """Every layer's key and value buffer (``compact_kv`` moves slots in all of them)."""
        return [tensor for layer in self.layers for tensor in (layer.keys, layer.values)]

    def compact(self, path: torch.Tensor, num_accepted: torch.Tensor, tree_start: torch.Tensor) -> None:
        """Move row b's accepted tree nodes ``path[b, :num_accepted[b]]`` (node i sits at slot
        tree_start[b] + 1 + i) to the slots right after the root, in every layer.

        ``compact_kv``'s semantics as one gather and one scatter per buffer, with no host read
        (the engine's CPU path; GPUs use the Triton op, one launch for all layers). Slots past the
        accepted ones move onto themselves.
        """
        nodes = torch.arange(path.shape[1], device=path.device)
        destination = tree_start[:, None] + 1 + nodes
        source = torch.where(
            nodes < num_accepted[:, None], tree_start[:, None] + 1 + path.clamp_min(0), destination
        )
        layer = self.layers[0].keys
        shape = (layer.shape[0], layer.shape[1], path.shape[1], layer.shape[3])
        source, destination = (index[:, None, :, None].expand(shape) for index in (source, destination))
        for buffer in self.tensors():
            buffer.scatter_(2, destination, buffer.gather(2, source))

    # writing ------------------------------------------------------------------------------------
    def prepare(self, width: int, *, static: bool) -> torch.Tensor:
        """The next forward writes ``width`` tokens per row at slots lengths[b] + 0..width-1.

        ``static``: decide nothing from host lengths (a compiled graph would specialise on them).
        """
        slots = self._slots[:, :width]
        slots.copy_(self.lengths[:, None] + self._steps[:width])
        self._uniform = self.batch == 1 or (not static and len(set(self.host_lengths)) == 1)
        return slots

    def write(self, buffer: torch.Tensor, states: torch.Tensor) -> None:
        slots = self._slots[:, : states.shape[2]]
        if self._uniform:
            buffer.index_copy_(2, slots[0], states)
        else:
            buffer.scatter_(
                2, slots[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3]), states
            )

    # committing ---------------------------------------------------------------------------------
    def check_room(self, width: int) -> None:
        """Raise unless every row can take ``width`` more slots (host-side; call before a forward)."""
        if self.max_length + width > self.capacity:
            raise ValueError(
                f"SlotCache: {self.max_length} + {width} slots exceed the capacity {self.capacity}"
            )

    def set_lengths(self, lengths: torch.Tensor, host_lengths: list[int]) -> None:
        """Row b now holds ``lengths[b]`` slots (device tensor; ``host_lengths`` its host copy)."""
        if max(host_lengths) > self.capacity:
            raise ValueError(f"SlotCache: {max(host_lengths)} slots exceed the capacity {self.capacity}")
        self.lengths.copy_(lengths)
        self.host_lengths = list(host_lengths)

    def advance(self, counts: torch.Tensor, host_counts: list[int]) -> None:
        self.set_lengths(self.lengths + counts, [a + b for a, b in zip(self.host_lengths, host_counts)])

    # plans --------------------------------------------------------------------------------------
    def block_plan(
        self, width: int, tree_mask: torch.Tensor | None, *, kernel: str | None, static: bool
    ) -> AttentionPlan:
        """The attention plan of a forward writing ``width`` tokens per row (after :meth:`prepare`).

        Query i of row b sees the row's committed slots [kv_start[b], lengths[b]) and, among the
        new tokens, ``tree_mask[b, i, j]`` ([B, W, W] bool; None = causal). ``static`` attends to
        the whole capacity (fixed shapes); otherwise to the slots in use. ``kernel``: run the
        ``tree_attention`` op with that backend instead of SDPA.
        """
        limit = None if static else self.max_length + width
        if kernel is not None:
            packed = None if tree_mask is None else pack_tree_mask(tree_mask)
            return AttentionPlan(
                kv_limit=limit,
                kernel=kernel,
                tree_mask=packed,
                kv_start=self.kv_start,
                kv_end=self.lengths + width,
            )
        if not static and tree_mask is None and width == 1 and self._uniform and not self._has_padding:
            return AttentionPlan(kv_limit=limit)  # one new token sees every used slot: no mask
        return AttentionPlan(mask=self.block_mask(width, tree_mask, limit), kv_limit=limit)

    def block_mask(self, width: int, tree_mask: torch.Tensor | None, limit: int | None) -> torch.Tensor:
        """[B, 1, W, L] bool visibility of a block forward (L = ``limit`` or the capacity)."""
        length = self.capacity if limit is None else limit
        slot = torch.arange(length, device=self.lengths.device)
        offset = slot - self.lengths[:, None]  # [B, L]: index of a slot among the new tokens
        committed = (slot >= self.kv_start[:, None]) & (offset < 0)
        inside = (offset >= 0) & (offset < width)
        node = offset.clamp(0, width - 1)[:, None, :].expand(-1, width, -1)  # [B, W, L]
        if tree_mask is None:
            among_new = node <= self._steps[:width, None]
        else:
            among_new = tree_mask.expand(self.batch, width, width).gather(2, node)
        return (committed[:, None, :] | (inside[:, None, :] & among_new))[:, None]

    def prefill_plan(self, width: int, *, kernel: str | None) -> AttentionPlan:
        """A prompt of ``width`` tokens written at slots 0..width-1 of every row (left padded)."""
        if not self._has_padding:
            if kernel is not None and width <= 128:
                return AttentionPlan(kv_limit=width, kernel=kernel)
            return AttentionPlan(kv_limit=width, is_causal=True)
        slot = torch.arange(width, device=self.lengths.device)
        visible = (slot[None, :] <= slot[:, None])[None] & (slot >= self.kv_start[:, None])[:, None, :]
        # A padding query sees nothing; let it see everything (its output is never read) rather
        # than give SDPA an empty row, which turns into NaN.
        visible = visible | ~visible.any(-1, keepdim=True)
        return AttentionPlan(mask=visible[:, None], kv_limit=width)

    def start(self, kv_start: torch.Tensor, width: int) -> None:
        """A new request: rows padded by ``kv_start`` [B], prompt of ``width`` slots to come."""
        self.kv_start.copy_(kv_start)
        self._has_padding = bool(kv_start.any())  # one read per request, outside the rounds
        self.lengths.zero_()
        self.host_lengths = [0] * self.batch
