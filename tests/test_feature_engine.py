"""The engine with a B1 feature head: lossless, aligned with the offline evaluation, sampled exactly.

Tiny random fp32 models (crossspec_kernels.testing_models) and a tiny Llama whose B1 head is trained
in seconds; backend="reference" throughout (plain PyTorch on CPU).
"""

from __future__ import annotations

import pytest
import torch

from crossspec_kernels import testing_models as tm
from crossspec_kernels.adapter_tools.feature_train import (
    FeatureTrainConfig,
    teacher_forcing_features,
    train_feature_head,
)
from crossspec_kernels.adapter_tools.offline_eval import accepted_lengths
from crossspec_kernels.models.adapters import AdapterConfig, LinearAdapter
from crossspec_kernels.models.feature_head import FeatureHead, feature_head_config, rollout
from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft

NEW_TOKENS = 12
DRAFTS = [ChainDraft(gamma=3), TreeDraft(top_k=2, depth=3, max_nodes=6)]


def b1_head(target, seed: int = 0) -> FeatureHead:
    torch.manual_seed(seed)
    head = FeatureHead(feature_head_config(target.config, "b1")).eval()
    head.load_embedding(target.get_input_embeddings().weight)
    return head


def expected(reference_model, inputs: dict) -> torch.Tensor:
    out = reference_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def event_drafter(inputs: dict):
    """A small unrelated LM behind a linear adapter, with its own left-padded prompt."""
    drafter = tm.tiny_llama(seed=7, head_dim=8)
    prompts = [
        torch.randint(3, 100, (4 + 2 * row,), generator=torch.Generator().manual_seed(row))
        for row in range(2)
    ]
    ids, mask = tm.left_pad(prompts[: inputs["input_ids"].shape[0]])
    torch.manual_seed(11)
    adapter = LinearAdapter(AdapterConfig(kind="linear", d_draft=32, d_target=64)).eval()
    return drafter, dict(input_ids=ids, attention_mask=mask), adapter


# ----------------------------------------------------------------------------------------------
# Losslessness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft", DRAFTS, ids=str)
@pytest.mark.parametrize("with_drafter", [False, True], ids=["head-only", "event+head"])
def test_greedy_equals_target_generate_batch2_left_padded(
    reference_model, target, batch_inputs, draft, with_drafter
):
    want = expected(reference_model, batch_inputs)
    drafter, drafter_inputs, adapter = event_drafter(batch_inputs) if with_drafter else (None, None, None)
    engine = CrossSpecEngine(
        target, drafter, adapter, draft=draft, backend="reference", feature_head=b1_head(target)
    )
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want), (out.sequences, want)
    stats = out.stats
    assert not stats["fallback"], stats["fallback_reason"]
    feature = stats["drafters"]["feature"]
    assert feature["row_rounds"] > 0 and feature["drafted"] > 0  # the head drafted every later round
    event = stats["drafters"]["event"]
    assert (event["row_rounds"] > 0) == with_drafter  # only during the prefill, only with a drafter


@pytest.mark.parametrize("row", [0, 1])
def test_batch1_matches_generate(reference_model, target, batch_inputs, row):
    mask = batch_inputs["attention_mask"][row].bool()
    inputs = dict(
        input_ids=batch_inputs["input_ids"][row][mask][None],
        pixel_values_videos=batch_inputs["pixel_values_videos"][row : row + 1],
    )
    engine = CrossSpecEngine(
        target, None, draft=ChainDraft(4), backend="reference", feature_head=b1_head(target, seed=row)
    )
    out = engine.generate(inputs, None, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, expected(reference_model, inputs))


def test_draft_vocab_is_lossless_and_drafts_only_its_ids(reference_model, target, batch_inputs, monkeypatch):
    from crossspec_kernels.runtime.engine import _Run

    vocab = torch.arange(0, tm.VOCAB_SIZE, 3)
    proposals = []
    original = _Run._propose

    def recording(self, model, hidden):
        proposal = original(self, model, hidden)
        proposals.append(proposal.tokens)
        return proposal

    monkeypatch.setattr(_Run, "_propose", recording)
    engine = CrossSpecEngine(
        target,
        None,
        draft=TreeDraft(2, 2, 4),
        backend="reference",
        feature_head=b1_head(target),
        draft_vocab=vocab,
    )
    out = engine.generate(batch_inputs, None, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, expected(reference_model, batch_inputs))
    drafted = torch.cat([p.flatten() for p in proposals])
    assert drafted.numel() > 0 and bool(torch.isin(drafted, vocab).all())


def test_head_failure_falls_back_losslessly(reference_model, target, batch_inputs, monkeypatch):
    from crossspec_kernels.runtime.feature_drafting import FeatureDraftModel

    calls = {"n": 0}
    original = FeatureDraftModel.catch_up

    def failing(self, pending):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("head bug in round 3")
        return original(self, pending)

    monkeypatch.setattr(FeatureDraftModel, "catch_up", failing)
    engine = CrossSpecEngine(target, None, backend="reference", feature_head=b1_head(target))
    out = engine.generate(batch_inputs, None, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, expected(reference_model, batch_inputs))
    assert out.stats["fallback"] and "head bug" in out.stats["fallback_reason"]


# ----------------------------------------------------------------------------------------------
# A trained head: the engine accepts exactly what the offline evaluation predicts
# ----------------------------------------------------------------------------------------------

VOCAB = 64


@pytest.fixture(scope="module")
def llama():
    return tm.learnable_llama(seed=0)


def greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


@pytest.fixture(scope="module")
def trained_head(llama):
    prompts = torch.randint(0, VOCAB, (48, 4), generator=torch.Generator().manual_seed(1))
    config = FeatureTrainConfig(steps=150, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, rollout_steps=2)
    head, _ = train_feature_head(
        llama, list(greedy(llama, prompts, 20)), "b1", config=config, show_progress=False
    )
    return head.eval()


def test_engine_acceptance_equals_the_offline_prediction(llama, trained_head):
    gamma, new_tokens = 3, 16
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(9))
    sequence = greedy(llama, prompt, new_tokens + gamma + 2)[0]
    engine = CrossSpecEngine(
        llama, None, draft=ChainDraft(gamma), backend="reference", feature_head=trained_head
    )
    out = engine.generate(dict(input_ids=prompt), None, max_new_tokens=new_tokens, eos_token_id=[])
    assert torch.equal(out.sequences[0], sequence[4 : 4 + new_tokens])

    # Offline: the chain rooted at head position q (prefix x_0..x_{q+1} committed).
    data = teacher_forcing_features(llama, [sequence], show_progress=False)
    with torch.no_grad():
        outputs = rollout(trained_head, data.features[0][None, :-1], sequence[None, 1:], gamma - 1).features
        drafts = torch.stack([(o[0] @ llama.lm_head.weight.T).argmax(-1) for o in outputs])
    truth = torch.cat([sequence[2:], sequence.new_full((1,), -1)])
    roots = torch.arange(len(sequence) - 2 - gamma + 1)
    lengths = accepted_lengths(drafts == truth[None], roots)
    # The engine's roots: round 1 commits the prefill's token (no drafter), then each round moves
    # the root past its accepted drafts and the bonus token.
    q, offered, accepted = 3, [0] * gamma, [0] * gamma
    while q + 2 <= 4 + new_tokens - 1:  # the round still runs (fewer than new_tokens committed)
        a = int(lengths[q])
        for k in range(min(a + 1, gamma)):
            offered[k] += 1
            accepted[k] += k < a
        q += a + 1
    stats = out.stats
    assert sum(accepted) > 0  # the trained head does get drafts accepted
    assert stats["drafters"]["feature"]["accepted"] == sum(accepted)
    assert stats["per_position_acceptance"] == pytest.approx(
        [a / o if o else 0.0 for a, o in zip(accepted, offered)]
    )


@pytest.mark.parametrize(
    "draft", [ChainDraft(6, min_confidence=0.6), TreeDraft(2, 4, 10, min_confidence=0.6)], ids=str
)
def test_adaptive_draft_length_is_lossless_and_drafts_less(llama, trained_head, draft):
    prompts = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    want = greedy(llama, prompts, 16)[:, 4:]
    fixed = ChainDraft(6) if isinstance(draft, ChainDraft) else TreeDraft(2, 4, 10)
    results = {}
    for name, config in (("adaptive", draft), ("fixed", fixed)):
        engine = CrossSpecEngine(llama, None, draft=config, backend="reference", feature_head=trained_head)
        out = engine.generate(dict(input_ids=prompts), None, max_new_tokens=16, eos_token_id=[])
        assert torch.equal(out.sequences, want), name
        results[name] = out.stats["drafters"]["feature"]
    # Fewer drafted positions per round once the head is unsure.
    per_round = {name: r["drafted"] / r["row_rounds"] for name, r in results.items()}
    assert per_round["adaptive"] < per_round["fixed"], per_round


def test_draft_config_confidence_is_checked():
    for bad in (-0.1, 1.0, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="min_confidence must be a float in \\[0, 1\\)"):
            ChainDraft(4, min_confidence=bad)
        with pytest.raises(ValueError, match="min_confidence"):
            TreeDraft(2, 2, 4, min_confidence=bad)


def test_sampling_keeps_the_target_distribution(llama, trained_head):
    """Second tokens (drafted by the head, verified by rejection sampling) vs the exact softmax."""
    pytest.importorskip("scipy")
    from test_verify_distribution import ChiSquare

    temperature, rows = 1.0, 3000
    prompt = torch.arange(5, 13)[None]
    inputs = dict(input_ids=prompt.expand(rows, -1))
    engine = CrossSpecEngine(llama, None, draft=ChainDraft(2), backend="reference", feature_head=trained_head)
    out = engine.generate(inputs, None, max_new_tokens=3, temperature=temperature, seed=7, eos_token_id=[])
    assert 0.0 < out.stats["drafters"]["feature"]["acceptance_rate"] < 1.0
    first, second = out.sequences[:, 0], out.sequences[:, 1]
    common = int(torch.mode(first).values)
    chosen = second[first == common]
    with torch.no_grad():
        context = torch.cat([prompt, torch.tensor([[common]])], 1)
        p_second = torch.softmax(llama(context).logits[0, -1].double() / temperature, -1)
    fit = ChiSquare()
    fit.add(torch.bincount(chosen, minlength=VOCAB).numpy(), p_second.numpy(), "second token")
    fit.check()


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_feature_head_arguments(target, batch_inputs):
    other = tm.tiny_llama(seed=3, head_dim=8)  # hidden 32, not the target's 64
    with pytest.raises(ValueError, match="feature_head is for vocab_size"):
        CrossSpecEngine(target, None, feature_head=b1_head(other))
    l5f = FeatureHead(feature_head_config(target.config, "l5f", d_draft=32))
    with pytest.raises(ValueError, match="kind 'l5f' is not run by the engine"):
        CrossSpecEngine(target, None, feature_head=l5f)
    adapter = LinearAdapter(AdapterConfig(kind="linear", d_draft=32, d_target=64))
    with pytest.raises(ValueError, match="feature_head must be a FeatureHead"):
        CrossSpecEngine(target, None, feature_head=adapter)
    with pytest.raises(ValueError, match="drafter=None needs a feature_head"):
        CrossSpecEngine(target, None)
    with pytest.raises(ValueError, match="draft_vocab restricts a feature head"):
        CrossSpecEngine(target, tm.tiny_video_llava(seed=0), draft_vocab=[1, 2])
    head = b1_head(target)
    with pytest.raises(ValueError, match=r"draft_vocab ids must lie in \[0, 128\)"):
        CrossSpecEngine(target, None, feature_head=head, draft_vocab=[1, 500])
    with pytest.raises(ValueError, match="repeated ids"):
        CrossSpecEngine(target, None, feature_head=head, draft_vocab=[1, 1])
    engine = CrossSpecEngine(target, None, feature_head=head, backend="reference")
    with pytest.raises(ValueError, match="pass drafter_inputs=None"):
        engine.generate(batch_inputs, dict(batch_inputs), max_new_tokens=2)
