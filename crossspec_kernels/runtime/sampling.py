"""How a sampled request draws its drafts, and the coupled mode that makes its output reproducible.

``"rejection"`` (the default): the drafter samples its chain from its own generator stream and
``verify`` runs recursive rejection sampling against the draft distribution q. Exact, and the most
accepted drafts, but the realised tokens depend on the drafts, hence on timing (how many free tokens
the prefill left room for), the round structure and the batch.

``"coupled"``: output token t of a row is the exponential race

    y_t = argmax_v  p_t(v) / E(seed, t, v),   E ~ Exp(1),   p_t = softmax(logits_t / T)

with E from Philox keyed by the row's seed, the position t (tokens generated before it) and v only,
so y_t is an exact sample of p_t. The drafter proposes argmax_v q_t(v) / E(seed, t, v) with the same
E, and verification is greedy on the perturbed target scores. The output then equals the target
sampling alone with the same seed (``CoupledSampling``, an HF logits processor), token for token,
whatever the drafter, the timing, the rounds or the batch. A draft is accepted when both races pick
the same token: probability >= (1 - TV) / (1 + TV) (Gumbel coupling), usually a little below
rejection sampling's 1 - TV, so pick it for reproducibility, not for speed.
"""

from __future__ import annotations

import torch

from crossspec_kernels.reference import sanitize_logits, vocab_uniforms
from crossspec_kernels.runtime import checks

SAMPLING_MODES = ("rejection", "coupled")

# The counter's row and slot fields of this stream: verify's rows and slots stay below 0xFFFF
# (MAX_BATCH, MAX_SLOTS), so the coupled noise never repeats a verify draw of the same seed.
_STREAM = 0xFFFF


class CoupledNoise:
    """The coupled race's noise for rows with seeds ``seed`` [B] int64 at temperature > 0."""

    def __init__(self, seed: torch.Tensor, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"CoupledNoise: temperature must be > 0, got {temperature!r}")
        self.seed, self.temperature = seed, float(temperature)

    def log_exponentials(self, position: torch.Tensor, vocab: int) -> torch.Tensor:
        """log E(seed, t, v) for t = ``position`` [B, S] and v < ``vocab``: [B, S, vocab] fp32."""
        seed = self.seed[:, None].expand_as(position)
        uniforms = vocab_uniforms(seed, position, _STREAM, _STREAM, vocab)
        return torch.log(-torch.log(uniforms))

    def target_scores(self, logits: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Scores whose argmax is y_t: logits / T - log E ([B, S, V] logits, [B, S] positions)."""
        scores = sanitize_logits(logits) / self.temperature
        return scores - self.log_exponentials(position, logits.shape[-1])

    def perturb(self, probs: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """log q(v) - log E(seed, t, v): ``probs`` [B, S, V'] over target ids 0..V'-1 (zeros off the
        drafter's vocabulary), ``position`` [B, S]. Its argmax is the coupled draft; its top-k a
        sample without replacement that starts with it (Gumbel top-k), a tree's children."""
        return probs.float().log() - self.log_exponentials(position, probs.shape[-1])

    def draw(self, probs: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The drafter's token at ``position`` [B] from ``probs`` [B, V']: argmax_v q(v) / E(seed, t, v)."""
        return self.perturb(probs[:, None], position[:, None])[:, 0].argmax(-1)


class StreamSampler:
    """Rejection mode's drafter: exponential race on the request's own generator stream."""

    keeps_probs = True  # verify needs q

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def draw(self, probs: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        return (probs / noise).argmax(-1)


class CoupledSampler:
    """Coupled mode's drafter: the target's race noise at each draft's position."""

    keeps_probs = False  # verification is greedy on the perturbed scores: no q

    def __init__(self, noise: CoupledNoise) -> None:
        self.noise = noise

    def draw(self, probs: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.noise.draw(probs, position)


class CoupledSampling:
    """The target sampling alone under the coupled race, as an HF logits processor: with it,
    ``target.generate(**inputs, do_sample=False, logits_processor=LogitsProcessorList([it]))`` returns
    what ``CrossSpecEngine.generate(..., temperature=T, seed=seed, sampling="coupled")`` returns.

    Args:
        seed: int in [0, 2^64), or one per row, as the engine's.
        temperature: > 0.
        prompt_width: input_ids.shape[1] of the (left-padded) prompt: position t = tokens generated.
    """

    def __init__(self, seed: int, temperature: float, prompt_width: int) -> None:
        checks.check_seeds(seed, len(seed) if isinstance(seed, (list, tuple)) else 1)
        self.seed = seed
        self.noise_temperature = checks.check_temperature(temperature)
        if self.noise_temperature == 0:
            raise ValueError("CoupledSampling: temperature must be > 0 (greedy needs no noise)")
        self.prompt_width = checks.check_int("prompt_width", prompt_width, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        seed = torch.tensor(checks.check_seeds(self.seed, batch), dtype=torch.int64, device=scores.device)
        position = torch.full((batch, 1), input_ids.shape[1] - self.prompt_width, device=scores.device)
        noise = CoupledNoise(seed, self.noise_temperature)
        return noise.target_scores(scores[:, None], position)[:, 0]
