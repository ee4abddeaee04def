"""One model's side of a generation: its Hugging Face KV cache and which of its slots are real.

Rows of a batch commit different numbers of tokens per round, but an HF cache appends the same
number of slots to every row. A row's unused slots therefore stay in the cache as holes; RoPE
positions count real tokens only (as ``generate`` derives them from the attention mask), so a row's
computation does not depend on the other rows.

How the mask reaches attention, without a host sync per forward:

* no holes (batch 1, rows that agree, any left padding of the prompt): ``attention_mask=None``
  and ``crossspec_kv_start`` = each row's left padding, the tree-attention kernel's fast path;
* holes: a 4-D [B, 1, Q, L] bool mask (real slots, causal over the new tokens), which transformers
  hands to attention as it is; the crossspec attention adds the tree mask and runs torch SDPA.

Whether a lane has holes is known on the host from the round's accepted counts.
"""

from __future__ import annotations

import inspect

import torch


class Lane:
    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model = model
        self.name = name
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, L] int64, 1 = real token
        self.kv_start: torch.Tensor | None = None  # [B] left padding of the prompt
        self.has_holes = False
        params = inspect.signature(model.forward).parameters
        self._takes_logits_to_keep = "logits_to_keep" in params

    @property
    def physical_length(self) -> int:
        return self.mask.shape[1]

    def real_lengths(self) -> torch.Tensor:
        """[B] number of real tokens per row: the RoPE position of the row's next token."""
        return self.mask.sum(-1)

    def prefill(self, inputs: dict, *, hidden: bool, last_logits_only: bool = True):
        """Run the prompt (left padding); positions as ``generate`` derives them from the mask."""
        inputs = dict(inputs)
        input_ids = inputs["input_ids"]
        mask = inputs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(input_ids)
        mask = mask.to(torch.int64)
        extra = {"logits_to_keep": 1} if last_logits_only and self._takes_logits_to_keep else {}
        out = self.model(
            **inputs,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            use_cache=True,
            output_hidden_states=hidden,
            return_dict=True,
            **extra,
        )
        self.cache = out.past_key_values
        self.mask = mask
        self.kv_start = (mask.cumsum(-1) == 0).sum(-1)
        # One sync per request, outside the rounds: is the prompt padded on the left only?
        left_only = (
            mask == (torch.arange(mask.shape[1], device=mask.device) >= self.kv_start[:, None])
        ).all()
        self.has_holes = not bool(left_only)
        return out

    def extend(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        hidden: bool = False,
    ):
        """Append a block [B, W] at explicit RoPE positions [B, W]; ``valid`` False marks a hole."""
        batch, width = tokens.shape
        new = torch.ones_like(tokens) if valid is None else valid.to(self.mask.dtype)
        mask = torch.cat([self.mask, new], dim=1)
        if valid is not None:
            self.has_holes = True
            tokens = torch.where(valid, tokens, 0)
        extra = {} if tree_mask is None else {"crossspec_tree_mask": tree_mask}
        if self.has_holes:
            length = mask.shape[1]
            causal = torch.ones(width, length, dtype=torch.bool, device=mask.device).tril(length - width)
            extra["attention_mask"] = mask.bool()[:, None, None, :] & causal
        else:
            extra["crossspec_kv_start"] = self.kv_start
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=hidden,
            return_dict=True,
            **extra,
        )
        self.cache = out.past_key_values
        self.mask = mask
        return out

    def keep(self, start: int, counts: torch.Tensor, physical_length: int, *, ragged: bool) -> None:
        """Row b keeps slots [start, start + counts[b]) as real ([B] device tensor); the cache is
        cropped to ``physical_length`` slots and a row's slots past its count become holes.
        ``ragged``: the counts differ (known on the host), so holes appear."""
        kept = torch.arange(physical_length - start, device=self.mask.device) < counts[:, None]
        self.mask = torch.cat([self.mask[:, :start], kept.to(self.mask.dtype)], dim=1)
        self.has_holes = self.has_holes or ragged
        self._crop(physical_length)

    def truncate(self, physical_length: int) -> None:
        """Forget every slot from ``physical_length`` on (a scratch forward's keys and values)."""
        self.mask = self.mask[:, :physical_length]
        self._crop(physical_length)

    def _crop(self, physical_length: int) -> None:
        # A negative crop drops that many trailing slots (transformers 5.18 removes positive ones).
        excess = self.cache.get_seq_length() - physical_length
        if excess > 0:
            self.cache.crop(-excess)
