"""Controlled acceptance: drafts that the target accepts with a chosen probability.

For speed measurements that must not depend on (random) weights: at every position the drafter's
proposal is replaced by the target's own greedy token with probability ``alpha``, else by a token
that differs from it. The drafter still does all of its work, so step costs stay real; greedy
verification then accepts each draft with probability ``alpha`` (until the first rejection), and
the output is still exactly the target's.

``reference`` is the target's greedy continuation (``target.generate(...)[:, prompt_len:]``);
positions past its end keep the drafter's own proposal. Greedy chains only.
"""

from __future__ import annotations

import math

import torch


class ControlledAcceptance:
    def __init__(self, reference: torch.Tensor, alpha: float, *, seed: int = 0) -> None:
        if not isinstance(reference, torch.Tensor) or reference.dim() != 2 or reference.dtype != torch.int64:
            got = (
                f"{reference.dtype} {tuple(reference.shape)}"
                if isinstance(reference, torch.Tensor)
                else reference
            )
            raise ValueError(f"ControlledAcceptance: reference must be an int64 [B, T] tensor, got {got}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"ControlledAcceptance: alpha must be a float in [0, 1], got {alpha!r}")
        if math.isnan(alpha):
            raise ValueError("ControlledAcceptance: alpha must be a float in [0, 1], got nan")
        self.reference = reference
        self.alpha = float(alpha)
        self.generator = torch.Generator(reference.device).manual_seed(seed)

    def check(self, batch: int, vocab: int, device: torch.device) -> None:
        if self.reference.shape[0] != batch:
            raise ValueError(
                f"ControlledAcceptance: reference has batch {self.reference.shape[0]}, the inputs {batch}"
            )
        if self.reference.device != device:
            raise ValueError(
                f"ControlledAcceptance: reference is on {self.reference.device}, the models on {device}"
            )
        if vocab < 2:
            raise ValueError("ControlledAcceptance: needs a shared vocabulary of at least 2 ids")
        self.vocab = vocab

    def apply(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B] drafted for new-token positions [B] (0 = the first generated token)."""
        length = self.reference.shape[1]
        inside = positions < length
        wanted = self.reference.gather(1, positions.clamp(max=length - 1)[:, None])[:, 0]
        keep = torch.rand(tokens.shape, generator=self.generator, device=tokens.device) < self.alpha
        # Any other id of the shared vocabulary (the reference may lie outside it: then any id differs).
        shift = torch.randint(1, self.vocab, tokens.shape, generator=self.generator, device=tokens.device)
        other = torch.where(wanted < self.vocab, (wanted + shift) % self.vocab, tokens)
        return torch.where(inside, torch.where(keep, wanted, other), tokens)
