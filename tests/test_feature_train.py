"""Feature-head training and offline evaluation on a tiny random Llama target (CPU, seconds)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from crossspec_kernels.adapter_tools.feature_train import (
    FeatureData,
    FeatureTrainConfig,
    frequent_tokens,
    teacher_forcing_features,
    train_feature_head,
)
from crossspec_kernels.adapter_tools.offline_eval import accepted_lengths, evaluate_feature_head
from crossspec_kernels.models.feature_head import FeatureHead, feature_head_config

VOCAB = 64


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits, so greedy continuations are not all one token
        model.lm_head.weight.mul_(8)
    return model


def greedy_corpus(target, count, seed, prompt_len=4, new_tokens=20):
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, VOCAB, (count, prompt_len), generator=gen)
    with torch.no_grad():
        out = target.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return list(out), [prompt_len] * count


def small_config(**overrides):
    settings = dict(
        steps=8, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, rollout_steps=2, checkpoint_every=3
    )
    settings.update(overrides)
    return FeatureTrainConfig(**settings)


def test_teacher_forcing_features_are_the_targets(target):
    sequences = [torch.randint(0, VOCAB, (n,)) for n in (5, 9, 7)]
    data = teacher_forcing_features(target, sequences, batch_size=2, show_progress=False)
    for tokens, features in zip(sequences, data.features):
        out = target(tokens[None], output_hidden_states=False)
        # The stored feature times the LM head is the target's own next-token logits.
        torch.testing.assert_close(features @ target.lm_head.weight.T, out.logits[0], rtol=1e-4, atol=1e-4)


def test_training_lowers_the_loss_and_beats_the_untrained_head(target):
    train, _ = greedy_corpus(target, 48, seed=1)
    held_out, prompt_lens = greedy_corpus(target, 12, seed=2)
    torch.manual_seed(0)
    untrained = FeatureHead(feature_head_config(target.config, "b1"))
    untrained.load_embedding(target.get_input_embeddings().weight)
    before = evaluate_feature_head(untrained, target, held_out, prompt_lens=prompt_lens, show_progress=False)
    head, history = train_feature_head(
        target, train, "b1", config=small_config(steps=150), show_progress=False
    )
    first, last = sum(h["loss"] for h in history[:10]) / 10, sum(h["loss"] for h in history[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    after = evaluate_feature_head(head, target, held_out, prompt_lens=prompt_lens, show_progress=False)
    assert after.mean_accepted_length > before.mean_accepted_length + 0.3, (before, after)
    assert after.accept_at[0] > 0.2 > before.accept_at[0]


@pytest.mark.parametrize("feature_noise", [0.0, 0.2])
def test_resume_is_bit_identical(target, tmp_path, feature_noise):
    corpus, _ = greedy_corpus(target, 16, seed=3)
    config = small_config(steps=6, feature_noise=feature_noise)
    straight, straight_history = train_feature_head(
        target, corpus, config=config, checkpoint_dir=tmp_path / "a", show_progress=False
    )
    # time_budget_s=0 stops (and checkpoints) after one step, as an interrupted run would.
    _, partial = train_feature_head(
        target, corpus, config=config, checkpoint_dir=tmp_path / "b", time_budget_s=0, show_progress=False
    )
    assert len(partial) == 1
    resumed, resumed_history = train_feature_head(
        target, corpus, config=config, checkpoint_dir=tmp_path / "b", show_progress=False
    )
    assert resumed_history == straight_history and len(resumed_history) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="was trained with"):
        train_feature_head(
            target,
            corpus,
            config=small_config(steps=6, lr=1e-2, feature_noise=feature_noise),
            checkpoint_dir=tmp_path / "b",
            show_progress=False,
        )


def test_feature_noise_changes_training_and_is_checked(target):
    corpus, _ = greedy_corpus(target, 8, seed=6)
    _, clean = train_feature_head(target, corpus, config=small_config(steps=2), show_progress=False)
    _, noisy = train_feature_head(
        target, corpus, config=small_config(steps=2, feature_noise=0.5), show_progress=False
    )
    assert clean[0]["loss"] != noisy[0]["loss"]  # same batch, same initial head: only the noise differs
    with pytest.raises(ValueError, match="feature_noise must be >= 0"):
        FeatureTrainConfig(feature_noise=-0.1)


def test_loss_vocab_and_frequent_tokens(target):
    corpus, _ = greedy_corpus(target, 8, seed=4)
    vocab = frequent_tokens(corpus, 20)
    counts = torch.bincount(torch.cat(corpus), minlength=VOCAB)
    assert vocab.numel() == min(20, int((counts > 0).sum())) and torch.equal(vocab, vocab.sort().values)
    assert counts[vocab].min() >= counts[~torch.isin(torch.arange(VOCAB), vocab)].max()
    _, history = train_feature_head(
        target, corpus, config=small_config(steps=2), loss_vocab=vocab, show_progress=False
    )
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_train_bad_inputs(target):
    with pytest.raises(ValueError, match="needs the event drafter's features"):
        train_feature_head(target, [[1, 2, 3]], "l5", d_draft=16, show_progress=False)
    with pytest.raises(ValueError, match="pass tokenizer="):
        train_feature_head(target, ["some text"], show_progress=False)
    with pytest.raises(ValueError, match=r"texts_or_token_batches\[1\] has 1 tokens"):
        train_feature_head(target, [[1, 2], [3]], show_progress=False)
    with pytest.raises(ValueError, match="needs FeatureData.drafter_features"):
        train_feature_head(
            target, FeatureData([torch.arange(3)], [torch.zeros(3, 32)]), "l5f", show_progress=False
        )
    with pytest.raises(ValueError, match="rollout_steps must be an int >= 0"):
        FeatureTrainConfig(rollout_steps=-1)
    other = FeatureHead(feature_head_config(target.config, "b1", vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="the target's LM head is"):
        train_feature_head(target, [[1, 2, 3]], head=other, show_progress=False)


def test_l5f_trains_on_drafter_features(target):
    corpus, _ = greedy_corpus(target, 8, seed=5)
    data = teacher_forcing_features(target, corpus, show_progress=False)
    gen = torch.Generator().manual_seed(0)
    data.drafter_features = [torch.randn(len(t), 16, generator=gen) for t in corpus]
    head, history = train_feature_head(
        target, data, "l5f", config=small_config(steps=3), d_draft=16, show_progress=False
    )
    assert head.config.kind == "l5f" and len(history) == 3
    report = evaluate_feature_head(head, target, data, gamma=2, show_progress=False)
    assert report.num_chains > 0


# ------------------------------------------------------------------------------------------------
# Offline evaluation


def test_accepted_lengths_brute_force():
    gen = torch.Generator().manual_seed(0)
    draft_ok = torch.rand(4, 30, generator=gen) < 0.7
    roots = torch.arange(0, 27)
    got = accepted_lengths(draft_ok, roots)
    for q, length in zip(roots.tolist(), got.tolist()):
        want = 0
        while want < 4 and draft_ok[want, q + want]:
            want += 1
        assert length == want


def test_offline_eval_matches_an_engine_style_greedy_chain(target):
    """The rollout-based count equals a chain that feeds the head's own drafts back (the engine)."""
    sequences, prompt_lens = greedy_corpus(target, 3, seed=6)
    torch.manual_seed(1)
    head, _ = train_feature_head(target, sequences, config=small_config(steps=20), show_progress=False)
    gamma = 3
    report = evaluate_feature_head(
        head, target, sequences, prompt_lens=prompt_lens, gamma=gamma, show_progress=False
    )
    data = teacher_forcing_features(target, sequences, show_progress=False)
    lengths = []
    with torch.no_grad():
        for tokens, features, prompt_len in zip(data.tokens, data.features, prompt_lens):
            for q in range(prompt_len - 1, len(tokens) - 2 - gamma + 1):
                cache = DynamicCache()
                out = head(
                    features[None, : q + 1], tokens[None, 1 : q + 2], torch.arange(q + 1)[None], cache
                )[:, -1:]
                accepted = 0
                for k in range(1, gamma + 1):
                    draft = (out @ target.lm_head.weight.T).argmax(-1)  # [1, 1], the head's own token
                    if int(draft) != int(tokens[q + k + 1]):
                        break
                    accepted += 1
                    out = head(out, draft, torch.tensor([[q + k]]), cache)
                lengths.append(accepted)
    lengths = torch.tensor(lengths)
    assert report.num_chains == len(lengths)
    assert report.accepted_length_histogram == torch.bincount(lengths, minlength=gamma + 1).tolist()
    assert report.mean_tokens_per_round == pytest.approx(report.mean_accepted_length + 1)
    assert report.accept_at[0] == pytest.approx(report.per_position_acceptance[0])


def test_offline_eval_bad_inputs(target):
    head = FeatureHead(feature_head_config(target.config, "b1"))
    with pytest.raises(ValueError, match="gamma must be an int >= 1"):
        evaluate_feature_head(head, target, [[1, 2, 3, 4]], gamma=0)
    with pytest.raises(ValueError, match="prompt_lens has 2 entries for 1 sequences"):
        evaluate_feature_head(head, target, [[1, 2, 3, 4]], prompt_lens=[1, 2], show_progress=False)
    with pytest.raises(ValueError, match="head must be a FeatureHead"):
        evaluate_feature_head(torch.nn.Linear(2, 2), target, [[1, 2, 3]])
