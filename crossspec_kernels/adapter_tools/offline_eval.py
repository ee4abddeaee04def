"""Offline acceptance of a feature head's greedy draft chains: what the engine's greedy rounds would see.

Held-out sequences are prompts followed by the target's own greedy continuation, so "the target's
greedy token" at every position is simply the next token of the sequence. A chain is rooted after
every committed prefix x_0..x_r inside the continuation: the head has read the target's real
features of x_0..x_{r-1} with their next tokens, then drafts gamma tokens rolled on its own
predicted features (``rollout``). The k-th draft is accepted when drafts 1..k all equal the target's
greedy tokens; because the rollout feeds the real tokens, it sees exactly the inputs the engine's
head sees whenever the earlier drafts were accepted, so the greedy numbers are exact.

Reported (``OfflineReport``): per-position acceptance alpha_k = P(draft k accepted | drafts < k
accepted), Accept@k = P(at least k accepted), the expected accepted length E[L] (drafts per round)
and E[L] + 1 (tokens per round, with the bonus token), and acceptance_rate = E[L] / gamma.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crossspec_kernels.adapter_tools._progress import progress
from crossspec_kernels.adapter_tools.feature_train import FeatureData, teacher_forcing_features

__all__ = ["OfflineReport", "accepted_lengths", "evaluate_feature_head"]


@dataclass
class OfflineReport:
    gamma: int
    num_chains: int
    per_position_acceptance: list[float]  # alpha_1..alpha_gamma
    accept_at: list[float]  # Accept@1..Accept@gamma
    mean_accepted_length: float  # E[L], drafts accepted per round
    mean_tokens_per_round: float  # E[L] + 1 (the bonus / correction token)
    acceptance_rate: float  # E[L] / gamma
    accepted_length_histogram: list[int]  # chains with L = 0..gamma

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def accepted_lengths(draft_ok: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
    """Accepted length of the chain at each root.

    ``draft_ok`` [S, T] bool: ``draft_ok[s, p]`` = rollout step s at head position p drafted the
    right token. The chain rooted at head position q drafts its k-th token (k = 1..S) at step k-1,
    position q + k - 1. ``roots`` [R] int64 positions q with q + S - 1 < T. Returns [R] int64 in [0, S].
    """
    steps = draft_ok.shape[0]
    offsets = torch.arange(steps, device=draft_ok.device)
    hits = draft_ok[offsets[None, :], roots[:, None] + offsets[None, :]]  # [R, S]
    return hits.long().cumprod(dim=1).sum(dim=1)


def _summarise(lengths: torch.Tensor, gamma: int) -> OfflineReport:
    count = max(lengths.numel(), 1)
    at_least = [float((lengths >= k).sum()) / count for k in range(gamma + 1)]
    alphas = [at_least[k] / at_least[k - 1] if at_least[k - 1] > 0 else 0.0 for k in range(1, gamma + 1)]
    mean = float(lengths.float().mean()) if lengths.numel() else 0.0
    return OfflineReport(
        gamma=gamma,
        num_chains=lengths.numel(),
        per_position_acceptance=alphas,
        accept_at=at_least[1:],
        mean_accepted_length=mean,
        mean_tokens_per_round=mean + 1.0,
        acceptance_rate=mean / gamma,
        accepted_length_histogram=torch.bincount(lengths, minlength=gamma + 1).tolist(),
    )


@torch.no_grad()
def evaluate_feature_head(
    head,
    target,
    sequences: Sequence[Sequence[int]] | FeatureData,
    *,
    prompt_lens: Sequence[int] | None = None,
    gamma: int = 4,
    show_progress: bool = True,
) -> OfflineReport:
    """Greedy chain acceptance of ``head`` on held-out ``sequences`` (prompt + target greedy output).

    ``prompt_lens[i]``: chains are rooted only where the committed prefix reaches into the
    continuation (the first root is the prefill's first token); None = everywhere. ``sequences`` may
    be a ``FeatureData`` (needed for l5/l5f, which read the drafter's features).
    """
    from crossspec_kernels.models.feature_head import FeatureHead, rollout

    if not isinstance(head, FeatureHead):
        raise ValueError(f"evaluate_feature_head: head must be a FeatureHead, got {type(head).__name__}")
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"evaluate_feature_head: gamma must be an int >= 1, got {gamma!r}")
    lm_weight = target.get_output_embeddings().weight.detach().float()
    if tuple(lm_weight.shape) != (head.config.vocab_size, head.config.d_target):
        raise ValueError(
            f"evaluate_feature_head: the head is for vocab_size={head.config.vocab_size}, d_target="
            f"{head.config.d_target}; the target's LM head is {list(lm_weight.shape)}"
        )
    if isinstance(sequences, FeatureData):
        data = sequences
    else:
        data = teacher_forcing_features(
            target, [torch.as_tensor(s, dtype=torch.int64) for s in sequences], show_progress=show_progress
        )
    if head.config.kind != "b1" and data.drafter_features is None:
        raise ValueError(
            f"evaluate_feature_head: a {head.config.kind!r} head needs FeatureData.drafter_features"
        )
    if prompt_lens is not None and len(prompt_lens) != len(data.tokens):
        raise ValueError(
            f"evaluate_feature_head: prompt_lens has {len(prompt_lens)} entries for {len(data.tokens)} sequences"
        )
    head.eval()
    dtype = head.fc.weight.dtype
    lengths = []
    bar = progress(total=len(data.tokens), desc="offline eval", unit="seq", disable=not show_progress)
    for i, tokens in enumerate(data.tokens):
        length = len(tokens)
        bar.update(1)
        # Head position q reads (feature q, token q+1); its step-s output drafts token q+s+2.
        first_root = 0 if prompt_lens is None else max(prompt_lens[i] - 1, 0)
        last_root = length - 2 - gamma  # the chain's last draft, token q + gamma + 1, must exist
        if last_root < first_root:
            continue
        feats = data.features[i][:-1]
        if head.config.kind != "b1":
            drafter = data.drafter_features[i][:-1]
            feats = drafter if head.config.kind == "l5" else torch.cat([drafter, feats], dim=-1)
        outputs = rollout(head, feats[None].to(dtype), tokens[None, 1:], gamma - 1).features
        drafts = torch.stack(
            [F.linear(out[0].float(), lm_weight).argmax(-1) for out in outputs]
        )  # [gamma, T-1]
        truth = torch.cat([tokens[2:], tokens.new_full((1,), -1)])  # token q+2 at position q
        roots = torch.arange(first_root, last_root + 1)
        lengths.append(accepted_lengths(drafts == truth[None], roots))
    bar.close()
    all_lengths = torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int64)
    return _summarise(all_lengths, gamma)
