"""The engine with feature heads: B1 (lossless, aligned with the offline evaluation, sampled exactly)
and L5 / L5F (lossless, chains and trees drafting from the event drafter's real features as
``rollout`` defines).

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
    temperature, rows = 1.0, 3000
    prompt = torch.arange(5, 13)[None]
    inputs = dict(input_ids=prompt.expand(rows, -1))
    engine = CrossSpecEngine(llama, None, draft=ChainDraft(2), backend="reference", feature_head=trained_head)
    out = engine.generate(inputs, None, max_new_tokens=3, temperature=temperature, seed=7, eos_token_id=[])
    assert 0.0 < out.stats["drafters"]["feature"]["acceptance_rate"] < 1.0
    check_second_token_distribution(llama, prompt, out.sequences, temperature)


def check_second_token_distribution(llama, prompt, sequences, temperature) -> None:
    """Chi-square: the second new token, among rows whose first is the most common one, follows
    softmax(target logits / T) after prompt + that first token."""
    from test_verify_distribution import ChiSquare

    first, second = sequences[:, 0], sequences[:, 1]
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
    with pytest.raises(
        ValueError, match="kind 'l5f' drafts from .* needs an event drafter, got drafter=None"
    ):
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


# ----------------------------------------------------------------------------------------------
# L5 / L5F: heads on the event drafter's features (L5F: and the target's)
# ----------------------------------------------------------------------------------------------

EVENT_KINDS = ["l5", "l5f"]


def event_head(target, kind: str, d_draft: int = 32, seed: int = 0) -> FeatureHead:
    torch.manual_seed(seed)
    head = FeatureHead(feature_head_config(target.config, kind, d_draft=d_draft)).eval()
    head.load_embedding(target.get_input_embeddings().weight)
    return head


def check_head_drafted(stats: dict, kind: str) -> None:
    """The head (not the event drafter) drafted every round after the first, and is labelled."""
    assert not stats["fallback"], stats["fallback_reason"]
    feature, event = stats["drafters"]["feature"], stats["drafters"]["event"]
    assert (feature["kind"], feature["label"]) == (kind, kind.upper())
    assert feature["row_rounds"] > 0 and feature["drafted"] > 0
    assert event["kind"] == "event" and event["row_rounds"] > 0  # the free tokens, during the prefill
    assert stats["rounds"] * len(stats["accepted_length_histogram"]) > 0


@pytest.mark.parametrize("draft", DRAFTS, ids=str)
@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_event_feature_head_greedy_equals_target_generate_batch2(
    reference_model, target, batch_inputs, kind, draft
):
    want = expected(reference_model, batch_inputs)
    drafter, drafter_inputs, adapter = event_drafter(batch_inputs)
    engine = CrossSpecEngine(
        target,
        drafter,
        adapter,
        draft=draft,
        backend="reference",
        feature_head=event_head(target, kind),
    )
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want), (out.sequences, want)
    check_head_drafted(out.stats, kind)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_event_feature_head_batch1_adaptive(reference_model, target, batch_inputs, kind, row, tree):
    inputs = tm.single_row(batch_inputs, row)
    drafter, drafter_inputs, adapter = event_drafter(batch_inputs)
    drafter_inputs = {name: value[row : row + 1] for name, value in drafter_inputs.items()}
    confidence = 0.0 if row == 0 else 0.001
    draft = (
        TreeDraft(2, 3, 6, min_confidence=confidence) if tree else ChainDraft(4, min_confidence=confidence)
    )
    engine = CrossSpecEngine(
        target,
        drafter,
        adapter,
        draft=draft,
        backend="reference",
        feature_head=event_head(target, kind, seed=row),
    )
    out = engine.generate(inputs, drafter_inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, expected(reference_model, inputs))
    check_head_drafted(out.stats, kind)


class RealFeatures:
    """What an L5 (L5F) head reads at each position of ``z`` (the committed new tokens, then
    drafts) in row ``row``, computed afresh by full forwards: the event drafter's g_j after its
    prompt and z[:j] (L5F: next to the target's f_j)."""

    def __init__(self, kind, reference_model, batch_inputs, drafter_inputs) -> None:
        self.kind, self.reference_model, self.batch_inputs = kind, reference_model, batch_inputs
        self.drafter = event_drafter(batch_inputs)[0]
        self.drafter_inputs = drafter_inputs

    @torch.no_grad()
    def __call__(self, row: int, z: torch.Tensor) -> torch.Tensor:
        inputs = self.drafter_inputs
        drafter_prompt = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]
        g = self.drafter.model(input_ids=torch.cat([drafter_prompt, z], 1)).last_hidden_state
        features = g[:, drafter_prompt.shape[1] - 1 :]  # g_j: after its prompt and z[:j]
        if self.kind == "l5f":
            # The prompt with its video, then z through the cache: a draft may be the video
            # placeholder id, which must not be read as one more video slot.
            seen = self.reference_model.model(**tm.single_row(self.batch_inputs, row), use_cache=True)
            after = self.reference_model.model(input_ids=z, past_key_values=seen.past_key_values)
            f = torch.cat([seen.last_hidden_state[:, -1:], after.last_hidden_state], 1)
            features = torch.cat([features, f], -1)
        return features


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "coupled"])
@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_event_feature_head_drafts_from_the_real_features(
    reference_model, target, batch_inputs, kind, temperature, monkeypatch
):
    """Every step of every chain the head drafts (batch 2, left padded) is what ``rollout`` gives
    on the drafter's (and the target's) features of the committed tokens and the chain's drafts,
    computed afresh by full forwards: the drafter's cache stays in step with the committed tokens,
    and each step pairs the right feature with the right token. Coupled sampling at T = 1 (flat
    tiny models: the shared noise decides most draws) gets drafts accepted, so the catch-up
    reads several tokens per row, a different number in each row."""
    from crossspec_kernels.runtime.engine import _Run
    from crossspec_kernels.runtime.feature_drafting import EventFeatureDraftModel
    from crossspec_kernels.runtime.sampling import CoupledNoise

    gamma, seed = 4, 5
    drafter, drafter_inputs, adapter = event_drafter(batch_inputs)
    chains, scored = [], []  # per head chain: (committed per row, finished per row, drafts, hidden)
    original_propose, original_score = _Run._propose, EventFeatureDraftModel.score

    def recording_score(self, hidden, *args, **kwargs):
        scored.append(hidden.clone())  # the head output that scores each draft
        return original_score(self, hidden, *args, **kwargs)

    def recording(self, model, hidden):
        scored.clear()
        proposal = original_propose(self, model, hidden)
        if model is self.head:
            committed = [torch.cat(pieces) for pieces in self.pieces]
            chains.append((committed, list(self.finished), proposal.tokens.clone(), torch.stack(scored, 1)))
        return proposal

    monkeypatch.setattr(_Run, "_propose", recording)
    monkeypatch.setattr(EventFeatureDraftModel, "score", recording_score)
    head = event_head(target, kind)
    engine = CrossSpecEngine(
        target, drafter, adapter, draft=ChainDraft(gamma), backend="reference", feature_head=head
    )
    out = engine.generate(
        batch_inputs,
        drafter_inputs,
        max_new_tokens=NEW_TOKENS,
        temperature=temperature,
        seed=seed,
        sampling="coupled",
        eos_token_id=[],
    )
    check_head_drafted(out.stats, kind)
    assert len(chains) == out.stats["rounds"] - 1
    if temperature == 0:
        assert torch.equal(out.sequences, expected(reference_model, batch_inputs))
    else:  # accepted drafts (the drafter's catch-up read them), and the target's own sample
        assert out.stats["drafters"]["feature"]["accepted"] >= 4, out.stats["drafters"]
        noise = CoupledNoise(torch.tensor([seed]), temperature)
        alone = tm.coupled_target_alone(reference_model, batch_inputs, seed, temperature, NEW_TOKENS)
        assert torch.equal(out.sequences, alone)
    lm_head = reference_model.get_output_embeddings().weight
    features_of = RealFeatures(kind, reference_model, batch_inputs, drafter_inputs)
    checked = 0
    for row in range(2):
        for committed, finished, drafts, hidden in chains:
            if finished[row]:
                continue
            # z: y_1..y_n then d_1..d_gamma; head slot j reads (features after y_1..y_j, z[j]).
            z = torch.cat([committed[row], drafts[row]])[None]
            n = committed[row].numel()
            width = n + gamma - 1
            with torch.no_grad():
                steps = rollout(head, features_of(row, z)[:, :width], z[:, :width], gamma - 1).features
            # Step s at position n - 1 + s scores the (s+1)-th draft of the chain rooted after y_n.
            want_hidden = torch.stack([steps[s][0, n - 1 + s] for s in range(gamma)])
            torch.testing.assert_close(hidden[row], want_hidden, atol=1e-5, rtol=1e-4)
            logits = want_hidden @ lm_head.T
            if temperature == 0:
                want = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                want = noise.draw(probs, n + torch.arange(gamma))  # draft s sits at position n + s
            assert torch.equal(drafts[row], want), (row, n, drafts[row], want)
            checked += 1
    assert checked >= out.stats["rounds"]


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_event_feature_head_tree_nodes_follow_their_paths(
    reference_model, target, batch_inputs, kind, monkeypatch
):
    """Every node of every tree the head drafts (batch 2, left padded) is among the top-k of what
    ``rollout`` predicts on its parent's path (committed tokens, then the path's drafts, features
    computed afresh), and each parent's best child is kept whenever any child is: each level
    pairs every node with its own parent's drafter feature."""
    from crossspec_kernels.runtime.engine import _Run

    draft = TreeDraft(top_k=2, depth=3, max_nodes=7)
    drafter, drafter_inputs, adapter = event_drafter(batch_inputs)
    trees, original_propose = [], _Run._propose

    def recording(self, model, hidden):
        proposal = original_propose(self, model, hidden)
        if model is self.head:
            committed = [torch.cat(pieces) for pieces in self.pieces]
            trees.append((committed, list(self.finished), proposal.tokens.clone(), proposal.parents.clone()))
        return proposal

    monkeypatch.setattr(_Run, "_propose", recording)
    head = event_head(target, kind)
    engine = CrossSpecEngine(target, drafter, adapter, draft=draft, backend="reference", feature_head=head)
    out = engine.generate(batch_inputs, drafter_inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(out.sequences, expected(reference_model, batch_inputs))
    check_head_drafted(out.stats, kind)
    lm_head = reference_model.get_output_embeddings().weight
    features_of = RealFeatures(kind, reference_model, batch_inputs, drafter_inputs)
    checked = 0
    for row in range(2):
        for committed, finished, tokens, parents in trees:
            if finished[row]:
                continue
            n = committed[row].numel()
            children: dict[int, list[int]] = {}
            for node, parent in enumerate(parents[row].tolist()):
                children.setdefault(parent, []).append(int(tokens[row, node]))
            for parent, kids in children.items():
                path = []  # the parent's ancestors' tokens, root side first (empty: the root)
                at = parent
                while at >= 0:
                    path.insert(0, int(tokens[row, at]))
                    at = int(parents[row, at])
                z = torch.cat([committed[row], torch.tensor(path, dtype=torch.int64)])[None]
                with torch.no_grad():
                    steps = rollout(head, features_of(row, z)[:, : z.shape[1]], z, len(path)).features
                logits = steps[len(path)][0, n - 1 + len(path)] @ lm_head.T
                top = logits.topk(draft.top_k).indices.tolist()
                assert set(kids) <= set(top), (row, n, path, kids, top)
                assert top[0] in kids, (row, n, path, kids, top)
                checked += 1
    assert checked >= out.stats["rounds"]


@pytest.mark.parametrize("draft", DRAFTS, ids=str)
@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_event_feature_head_coupled_sampling_equals_target_alone(
    reference_model, target, batch_inputs, kind, draft
):
    from test_coupled_sampling import TEMPERATURE, target_alone

    drafter, drafter_inputs, adapter = event_drafter(batch_inputs)
    engine = CrossSpecEngine(
        target,
        drafter,
        adapter,
        draft=draft,
        backend="reference",
        feature_head=event_head(target, kind),
    )
    for seed in (0, [3, 2**64 - 1]):
        out = engine.generate(
            batch_inputs,
            drafter_inputs,
            max_new_tokens=NEW_TOKENS,
            temperature=TEMPERATURE,
            seed=seed,
            sampling="coupled",
            eos_token_id=[],
        )
        assert torch.equal(out.sequences, target_alone(reference_model, batch_inputs, seed)), seed
        check_head_drafted(out.stats, kind)


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_event_feature_head_sampling_keeps_the_target_distribution(llama, kind):
    """Second tokens (drafted by the head, verified by rejection sampling) vs the exact softmax."""
    pytest.importorskip("scipy")
    temperature, rows = 1.0, 3000
    prompt = torch.arange(5, 13)[None]
    inputs = dict(input_ids=prompt.expand(rows, -1))
    drafter = tm.learnable_llama(seed=1)
    engine = CrossSpecEngine(
        llama,
        drafter,
        draft=ChainDraft(2),
        free_token_budget=1,  # the head drafts most second tokens
        backend="reference",
        feature_head=event_head(llama, kind),
    )
    out = engine.generate(
        inputs, dict(inputs), max_new_tokens=3, temperature=temperature, seed=7, eos_token_id=[]
    )
    assert 0.0 < out.stats["drafters"]["feature"]["acceptance_rate"] < 1.0
    check_second_token_distribution(llama, prompt, out.sequences, temperature)


def test_bad_event_feature_head_arguments(target):
    drafter, _, adapter = event_drafter({"input_ids": torch.zeros(1, 1)})
    for kind in EVENT_KINDS:
        with pytest.raises(ValueError, match=f"feature_head of kind '{kind}' .*got drafter=None"):
            CrossSpecEngine(target, None, feature_head=event_head(target, kind))
        wrong = event_head(target, kind, d_draft=48)
        with pytest.raises(
            ValueError, match="reads drafter features of d_draft=48, but the drafter's hidden size is 32"
        ):
            CrossSpecEngine(target, drafter, adapter, feature_head=wrong)
        other = tm.tiny_llama(seed=3, head_dim=8)  # hidden 32, not the target's 64
        with pytest.raises(ValueError, match="feature_head is for vocab_size"):
            CrossSpecEngine(target, drafter, adapter, feature_head=event_head(other, kind))
