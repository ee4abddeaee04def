"""Coupled sampling: the engine's sampled output equals the target sampling alone, token for token.

``CoupledSampling`` (an HF logits processor) is the target-only sampler; the engine with
``sampling="coupled"`` must reproduce it whatever the drafter, the draft shape, the timing of
prefill hiding, the batch it runs in, and it must stay an exact sample of softmax(logits / T).
"""

from __future__ import annotations

import pytest
import torch

from crossspec_kernels import testing_models as tm
from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft
from crossspec_kernels.runtime.sampling import CoupledNoise, CoupledSampling

NEW_TOKENS = 12
TEMPERATURE = 0.05  # the tiny models' logits are nearly flat (std ~0.17): sharpen them


@pytest.fixture(scope="module")
def drafter():
    return tm.perturbed(tm.tiny_video_llava(seed=0), 0.3, seed=5)


single = tm.single_row


def target_alone(model, inputs: dict, seed) -> torch.Tensor:
    return tm.coupled_target_alone(model, inputs, seed, TEMPERATURE, NEW_TOKENS)


def coupled(engine, inputs: dict, seed, **kwargs):
    return engine.generate(
        inputs,
        dict(inputs),
        max_new_tokens=NEW_TOKENS,
        temperature=TEMPERATURE,
        seed=seed,
        sampling="coupled",
        eos_token_id=[],
        **kwargs,
    )


@pytest.mark.parametrize("draft", [ChainDraft(4), TreeDraft(2, 3, 6)], ids=str)
def test_coupled_equals_target_sampling_alone(reference_model, target, drafter, batch_inputs, draft):
    engine = CrossSpecEngine(target, drafter, draft=draft, backend="reference")
    for seed in (0, 7, [3, 2**64 - 1]):
        out = coupled(engine, batch_inputs, seed)
        assert torch.equal(out.sequences, target_alone(reference_model, batch_inputs, seed)), seed
        assert out.stats["sampling"] == "coupled"
        assert out.stats["acceptance_rate"] > 0  # the drafts were drawn with the target's noise


def test_coupled_is_independent_of_the_batch_and_the_timing(reference_model, target, drafter, batch_inputs):
    """A row alone or inside a batch, with prefill hiding on (free-token counts vary): same tokens."""
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(3), free_token_budget=6, backend="reference")
    batched = coupled(engine, batch_inputs, [11, 12]).sequences
    runs = {tuple(coupled(engine, single(batch_inputs, 1), 12).sequences[0].tolist()) for _ in range(10)}
    assert runs == {tuple(batched[1].tolist())}
    sequential = CrossSpecEngine(target, drafter, draft=ChainDraft(3), overlap=False, backend="reference")
    assert torch.equal(coupled(sequential, single(batch_inputs, 0), 11).sequences, batched[:1])


def test_coupled_with_a_drafter_that_never_agrees(reference_model, target, batch_inputs):
    """Drafts from an unrelated model: almost all rejected, the output is still the target's."""
    other = tm.tiny_video_llava(seed=9)
    engine = CrossSpecEngine(target, other, draft=ChainDraft(2), backend="reference")
    out = coupled(engine, batch_inputs, 5)
    assert torch.equal(out.sequences, target_alone(reference_model, batch_inputs, 5))


def test_coupled_race_is_an_exact_sample():
    """The race y = argmax logits / T - log E over 20000 seeds follows softmax(logits / T)."""
    pytest.importorskip("scipy")
    from test_verify_distribution import ChiSquare

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("nan")]])
    rows = 20000
    noise = CoupledNoise(torch.arange(rows, dtype=torch.int64), temperature=0.8)
    scores = noise.target_scores(logits.expand(rows, -1)[:, None], torch.full((rows, 1), 3))[:, 0]
    counts = torch.bincount(scores.argmax(-1), minlength=7)
    assert counts[6] == 0  # a NaN logit never wins
    probs = torch.softmax(logits[0, :6].double() / 0.8, -1)
    fit = ChiSquare()
    fit.add(counts[:6].numpy(), probs.numpy(), "coupled race")
    fit.check()
    # The drafter's draw with the same noise and the same distribution picks the same tokens.
    drawn = noise.draw(torch.softmax(logits[:, :6] / 0.8, -1).expand(rows, -1), torch.full((rows,), 3))
    assert torch.equal(drawn, scores.argmax(-1))


def test_coupled_noise_depends_on_position_and_seed_only():
    noise = CoupledNoise(torch.tensor([5, 5, 6]), temperature=1.0)
    log_e = noise.log_exponentials(torch.tensor([[0, 1], [0, 1], [0, 1]]), 10)
    assert torch.equal(log_e[0], log_e[1])  # same seed, same positions: same noise in any row
    assert not torch.equal(log_e[0], log_e[2])
    assert not torch.equal(log_e[0, 0], log_e[0, 1])


def test_bad_sampling_arguments(target, drafter, batch_inputs):
    engine = CrossSpecEngine(target, drafter, draft=ChainDraft(2), backend="reference")
    with pytest.raises(ValueError, match="sampling must be one of"):
        engine.generate(batch_inputs, batch_inputs, max_new_tokens=2, temperature=1.0, sampling="gumbel")
    with pytest.raises(ValueError, match="seed has 3 entries for a batch of 2"):
        engine.generate(batch_inputs, batch_inputs, max_new_tokens=2, temperature=1.0, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        CoupledSampling(0, 0.0, 4)
    with pytest.raises(ValueError, match="seed must be an int"):
        CoupledSampling(-1, 1.0, 4)
