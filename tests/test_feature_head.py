"""FeatureHead (B1 / L5 / L5F): shapes, causality, KV cache, padding, rollout vs an explicit chain,
save/load, config from a target, bad inputs."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from crossspec_kernels.models.adapters import load_adapter, num_parameters, save_pretrained
from crossspec_kernels.models.feature_head import (
    FeatureHead,
    feature_head_config,
    rollout,
    rollout_mask,
)

VOCAB, D_TARGET, D_DRAFT = 101, 48, 40


def target_config(**overrides):
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=D_TARGET,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def make_head(kind="b1", seed=0, **overrides):
    torch.manual_seed(seed)
    extra = {} if kind == "b1" else {"d_draft": D_DRAFT}
    head = FeatureHead(feature_head_config(target_config(), kind, **{**extra, **overrides}))
    with torch.no_grad():  # norm weights away from 1 so a wrong norm cannot pass unnoticed
        for name, param in head.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
    return head.eval()


def make_inputs(head, batch=2, width=9, seed=1):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, width, head.config.d_features, generator=gen)
    tokens = torch.randint(0, VOCAB, (batch, width), generator=gen)
    positions = torch.arange(width)[None].expand(batch, -1)
    return features, tokens, positions


KINDS = ["b1", "l5", "l5f"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,width", [(1, 1), (2, 9), (3, 17)])
def test_shapes(kind, batch, width):
    head = make_head(kind)
    out = head(*make_inputs(head, batch, width))
    assert out.shape == (batch, width, D_TARGET) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_causal(kind):
    head = make_head(kind)
    features, tokens, positions = make_inputs(head, width=11)
    base = head(features, tokens, positions)
    features2, tokens2 = features.clone(), tokens.clone()
    features2[:, 6] += 1.0
    tokens2[:, 6] = (tokens2[:, 6] + 1) % VOCAB
    changed = head(features2, tokens2, positions)
    torch.testing.assert_close(changed[:, :6], base[:, :6], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 6:], base[:, 6:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("splits", [(5, 8), (1, 1, 1, 10), (12, 1)])
def test_cache_matches_no_cache(kind, splits):
    head = make_head(kind)
    features, tokens, positions = make_inputs(head, width=sum(splits))
    full = head(features, tokens, positions)
    cache, parts, start = DynamicCache(), [], 0
    for size in splits:
        sl = slice(start, start + size)
        parts.append(head(features[:, sl], tokens[:, sl], positions[:, sl], past_key_values=cache))
        start += size
    assert cache.get_seq_length() == sum(splits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded():
    head = make_head("b1")
    features, tokens, _ = make_inputs(head, batch=1, width=7)
    alone = head(features, tokens, torch.arange(7)[None])
    pad = 3
    padded_features = torch.cat([torch.randn(1, pad, D_TARGET), features], 1)
    padded_tokens = torch.cat([torch.zeros(1, pad, dtype=torch.long), tokens], 1)
    mask = torch.tensor([[0] * pad + [1] * 7])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = head(padded_features, padded_tokens, positions, attention_mask=mask)
    torch.testing.assert_close(padded[:, pad:], alone, rtol=1e-5, atol=1e-5)


def test_eager_matches_sdpa():
    head = make_head("l5f")
    inputs = make_inputs(head, width=10)
    sdpa = head(*inputs)
    head.set_attn_implementation("eager")
    torch.testing.assert_close(head(*inputs), sdpa, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="name must be 'eager' or a registered"):
        head.set_attn_implementation("no-such-attention")


def test_rotary_matches_target():
    # The head's RoPE must be the target's (rope_theta travels through feature_head_config).
    config = target_config()
    head = make_head("b1")
    x, positions = torch.randn(1, 5, D_TARGET), torch.arange(5)[None] * 37
    for got, want in zip(head.rotary_emb(x, positions), LlamaRotaryEmbedding(config)(x, positions)):
        torch.testing.assert_close(got, want)
    assert head.config.rope_theta == 5000.0 and head.config.num_kv_heads == 2


def test_rollout_mask_small():
    want_step1 = torch.tensor(
        [[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool
    )  # query p sees real 0..p-1 and its own chain entry p
    assert torch.equal(rollout_mask(3, 1)[0, 0], want_step1)
    assert rollout_mask(4, 3).shape == (1, 1, 4, 16)


@pytest.mark.parametrize("kind", ["b1", "l5f"])
def test_rollout_matches_explicit_chain(kind):
    """Step s at position p equals the engine's chain: real inputs up to p - s, then s rolled steps."""
    head = make_head(kind)
    features, tokens, positions = make_inputs(head, batch=2, width=10)
    steps = 3
    rolled = rollout(head, features, tokens, steps).features
    d_draft = head.config.d_draft
    for start in (0, 3, 6):  # the chain leaves the real inputs at position `start`
        cache = DynamicCache()
        sl = slice(0, start + 1)
        out = head(features[:, sl], tokens[:, sl], positions[:, sl], past_key_values=cache)[:, -1:]
        torch.testing.assert_close(out[:, 0], rolled[0][:, start], rtol=1e-5, atol=1e-5)
        for step in range(1, steps + 1):
            p = start + step
            step_features = out if kind == "b1" else torch.cat([features[:, p : p + 1, :d_draft], out], -1)
            out = head(step_features, tokens[:, p : p + 1], positions[:, p : p + 1], past_key_values=cache)
            torch.testing.assert_close(out[:, 0], rolled[step][:, p], rtol=1e-5, atol=1e-5)


def test_rollout_l5_steps_equal_teacher_forcing_and_logits():
    head = make_head("l5")
    features, tokens, _ = make_inputs(head)
    lm_weight = torch.randn(VOCAB, D_TARGET)
    result = rollout(head, features, tokens, 2, lm_weight)
    assert len(result.features) == 3 and all(torch.equal(f, result.features[0]) for f in result.features)
    torch.testing.assert_close(result.logits[1], result.features[1] @ lm_weight.T)
    assert rollout(head, features, tokens, 0).logits is None


def test_rollout_gradients_reach_every_step():
    head = make_head("b1").train()
    features, tokens, _ = make_inputs(head)
    result = rollout(head, features, tokens, 2)
    result.features[2][:, 5:].sum().backward()
    assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    assert head.embed_tokens.weight.grad is None  # the target's embedding stays frozen


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    head = make_head(kind)
    embedding = torch.randn(VOCAB, D_TARGET)
    head.load_embedding(embedding)
    inputs = make_inputs(head)
    want = head(*inputs)
    save_pretrained(head, tmp_path)
    loaded = load_adapter(tmp_path, expected_kind=kind)
    assert isinstance(loaded, FeatureHead) and loaded.config == head.config
    with pytest.raises(ValueError, match="token embedding was not saved"):
        loaded(*inputs)
    loaded.load_embedding(embedding)
    torch.testing.assert_close(loaded.eval()(*inputs), want, rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=f"holds a '{kind}' adapter, expected 'l5'|holds a 'l5' adapter, expected 'b1'"
    ):
        load_adapter(tmp_path, expected_kind="l5" if kind != "l5" else "b1")


def test_saved_file_leaves_out_the_embedding(tmp_path):
    from safetensors.torch import load_file

    head = make_head("b1")
    save_pretrained(head, tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    assert "embed_tokens.weight" not in saved
    assert sum(t.numel() for t in saved.values()) == num_parameters(head) + sum(
        b.numel() for name, b in head.named_buffers() if name in saved
    )
    trained = make_head("b1", train_embedding=True)
    save_pretrained(trained, tmp_path / "trained")
    assert "embed_tokens.weight" in load_file(tmp_path / "trained" / "adapter.safetensors")


def test_load_embedding_share_and_errors():
    head = make_head("b1")
    table = torch.randn(VOCAB, D_TARGET)
    head.load_embedding(table, share=True)
    assert head.embed_tokens.weight.data_ptr() == table.data_ptr()
    with pytest.raises(
        ValueError, match=r"weight must be the target's input embedding \[vocab_size, d_target\]"
    ):
        head.load_embedding(torch.randn(VOCAB + 1, D_TARGET))
    with pytest.raises(ValueError, match="share=True needs weight on"):
        head.load_embedding(table.double(), share=True)


def test_config_from_vlm_and_errors():
    class VLM:
        text_config = target_config()

    config = feature_head_config(VLM(), "l5f", d_draft=D_DRAFT)
    assert (config.d_target, config.d_draft, config.vocab_size, config.label) == (
        D_TARGET,
        D_DRAFT,
        VOCAB,
        "L5F",
    )
    assert config.d_features == D_DRAFT + D_TARGET
    with pytest.raises(ValueError, match="kind must be one of"):
        feature_head_config(target_config(), "eagle")
    with pytest.raises(ValueError, match="kind='b1' reads the target's features only"):
        feature_head_config(target_config(), "b1", d_draft=D_DRAFT)
    with pytest.raises(ValueError, match="target_config has no int 'hidden_size'"):
        feature_head_config(object(), "b1")


def test_bad_inputs():
    head = make_head("l5f")
    features, tokens, positions = make_inputs(head)
    with pytest.raises(ValueError, match="an l5f head needs both"):
        head(features[..., D_DRAFT:], tokens, positions)  # target features only
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        head(features, tokens.float(), positions)
    with pytest.raises(ValueError, match=r"tokens must be in \[0, vocab_size=101\)"):
        head(features, tokens + VOCAB, positions)
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        head(features, tokens, positions[:, :3])
    with pytest.raises(ValueError, match="2-D attention_mask must be"):
        head(features, tokens, positions, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="4-D attention_mask must be bool"):
        head(features, tokens, positions, attention_mask=torch.ones(2, 1, 9, 9))
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        rollout(head, features, tokens, -1)
    with pytest.raises(ValueError, match="head must be a FeatureHead"):
        rollout(torch.nn.Linear(2, 2), features, tokens, 1)
