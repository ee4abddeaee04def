"""Adapters: shapes, the bottleneck's math, EAGLE inputs, L2/L4, research labels and sizes, save/load, bad inputs."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from crossspec_kernels.models import (
    Adapter,
    AdapterConfig,
    AttentionAdapter,
    BottleneckAdapter,
    EagleAdapter,
    LinearAdapter,
    StackedBottleneckAdapter,
    build_adapter,
    load_adapter,
    research_adapter_config,
    save_pretrained,
)
from crossspec_kernels.models.adapters import CONFIG_NAME, RESEARCH_ADAPTERS, WEIGHTS_NAME, num_parameters

VOCAB = 97


def make_config(kind, d_draft=40, d_target=48, **overrides):
    extra = {"vocab_size": VOCAB} if kind == "eagle" else {}
    return AdapterConfig(kind=kind, d_draft=d_draft, d_target=d_target, rank=12, **{**extra, **overrides})


def make_adapter(kind, seed=0, **overrides):
    torch.manual_seed(seed)
    adapter = build_adapter(make_config(kind, **overrides))
    # Randomise every parameter (incl. norm weights) so round trips and formulas are not trivially met.
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.dim() == 1 else 0.0))
    return adapter.eval()


def make_inputs(adapter, lead=(3, 7), seed=1):
    gen = torch.Generator().manual_seed(seed)
    cfg = adapter.config
    inputs = {"drafter_hidden": torch.randn(*lead, cfg.d_draft, generator=gen)}
    kwargs = {}
    if cfg.kind == "eagle":
        kwargs["prev_tokens"] = torch.randint(0, VOCAB, lead, generator=gen)
        if cfg.use_target_hidden:
            kwargs["target_hidden"] = torch.randn(*lead, cfg.d_target, generator=gen)
    return inputs["drafter_hidden"], kwargs


ALL_KINDS = [
    pytest.param("linear", {}, id="linear"),
    pytest.param("bottleneck", {}, id="bottleneck"),
    pytest.param("eagle", {}, id="eagle"),
    pytest.param("eagle", {"use_target_hidden": True}, id="eagle-L5F"),
    pytest.param("stacked_bottleneck", {"num_layers": 2}, id="stacked_bottleneck-L2"),
    pytest.param("attention", {"window": 4, "intermediate_size": 24}, id="attention-L4"),
]


@pytest.mark.parametrize("kind,overrides", ALL_KINDS)
@pytest.mark.parametrize("d_draft,d_target", [(40, 48), (48, 48), (64, 32)])
@pytest.mark.parametrize("lead", [(5,), (2, 7), (2, 3, 4)])
def test_shapes(kind, overrides, d_draft, d_target, lead):
    adapter = make_adapter(kind, d_draft=d_draft, d_target=d_target, **overrides)
    hidden, kwargs = make_inputs(adapter, lead=lead)
    out = adapter(hidden, **kwargs)
    assert out.shape == (*lead, d_target)
    assert out.dtype == hidden.dtype
    assert torch.isfinite(out).all()
    assert isinstance(adapter, Adapter)


def test_classes_and_single_vector():
    assert type(make_adapter("linear")) is LinearAdapter
    assert type(make_adapter("bottleneck")) is BottleneckAdapter
    eagle = make_adapter("eagle")
    assert type(eagle) is EagleAdapter
    out = eagle(torch.randn(40), prev_tokens=torch.tensor(3))
    assert out.shape == (48,)


@pytest.mark.parametrize("d_draft,d_target", [(40, 48), (48, 48)])
def test_bottleneck_matches_formula(d_draft, d_target):
    adapter = make_adapter("bottleneck", d_draft=d_draft, d_target=d_target)
    assert (adapter.proj is None) == (d_draft == d_target)
    params = {k: (None if v is None else v.detach().double()) for k, v in adapter.fused_params().items()}
    assert set(params) == {
        "norm_weight",
        "norm_bias",
        "down_weight",
        "down_bias",
        "up_weight",
        "up_bias",
        "proj_weight",
    }
    assert params["down_weight"].shape == (12, d_draft)
    assert params["up_weight"].shape == (d_target, 12)

    x = torch.randn(4, 6, d_draft, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + adapter.eps) * params["norm_weight"] + params["norm_bias"]
    down = normed @ params["down_weight"].T + params["down_bias"]
    gelu = 0.5 * down * (1.0 + torch.erf(down / math.sqrt(2.0)))
    up = gelu @ params["up_weight"].T + params["up_bias"]
    residual = x if params["proj_weight"] is None else x @ params["proj_weight"].T
    expected = up + residual

    got = adapter.double()(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_bottleneck_without_bias():
    adapter = make_adapter("bottleneck", bias=False)
    assert adapter.fused_params()["down_bias"] is None and adapter.fused_params()["up_bias"] is None
    assert adapter(torch.randn(2, 40)).shape == (2, 48)


def test_linear_matches_formula():
    adapter = make_adapter("linear")
    x = torch.randn(5, 40)
    torch.testing.assert_close(adapter(x), x @ adapter.linear.weight.T + adapter.linear.bias)


def test_eagle_uses_prev_tokens():
    adapter = make_adapter("eagle")
    hidden, kwargs = make_inputs(adapter, lead=(2, 6))
    base = adapter(hidden, **kwargs)
    changed = kwargs["prev_tokens"].clone()
    changed[:, 3] = (changed[:, 3] + 1) % VOCAB
    out = adapter(hidden, prev_tokens=changed)
    # Causal: positions before 3 are untouched, position 3 and later change.
    torch.testing.assert_close(out[:, :3], base[:, :3])
    assert (out[:, 3:] - base[:, 3:]).abs().amax(-1).min() > 1e-4


def test_eagle_is_causal_in_drafter_hidden():
    adapter = make_adapter("eagle")
    hidden, kwargs = make_inputs(adapter, lead=(2, 6))
    base = adapter(hidden, **kwargs)
    prefix = adapter(hidden[:, :4], prev_tokens=kwargs["prev_tokens"][:, :4])
    torch.testing.assert_close(prefix, base[:, :4], rtol=1e-5, atol=1e-5)


def test_eagle_uses_target_hidden_when_enabled():
    adapter = make_adapter("eagle", use_target_hidden=True)
    hidden, kwargs = make_inputs(adapter, lead=(2, 5))
    base = adapter(hidden, **kwargs)
    out = adapter(hidden, prev_tokens=kwargs["prev_tokens"], target_hidden=kwargs["target_hidden"] + 1.0)
    assert (out - base).abs().max() > 1e-3
    assert adapter.fc.in_features == 40 + 48 + 48


def test_eagle_load_embedding():
    adapter = make_adapter("eagle")
    table = torch.randn(VOCAB, 48)
    adapter.load_embedding(table)
    assert torch.equal(adapter.embed.weight, table)
    assert not adapter.embed.weight.requires_grad
    with pytest.raises(ValueError, match="load_embedding: weight must be"):
        adapter.load_embedding(torch.randn(VOCAB, 47))


@pytest.mark.parametrize("kind,overrides", ALL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, kind, overrides, dtype):
    adapter = make_adapter(kind, **overrides).to(dtype)
    hidden, kwargs = make_inputs(adapter)
    hidden = hidden.to(dtype)
    kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kwargs.items()}
    adapter.save_pretrained(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    for loaded in (
        load_adapter(tmp_path / "a"),
        Adapter.from_pretrained(tmp_path / "a"),
        type(adapter).from_pretrained(str(tmp_path / "a")),
    ):
        assert type(loaded) is type(adapter)
        assert loaded.config == adapter.config
        assert next(loaded.parameters()).dtype == dtype
        assert torch.equal(loaded.eval()(hidden, **kwargs), adapter(hidden, **kwargs))

    # Module-level save is the same format; dtype override on load.
    save_pretrained(adapter, tmp_path / "b")
    as_fp64 = load_adapter(tmp_path / "b", dtype=torch.float64)
    assert next(as_fp64.parameters()).dtype == torch.float64


@pytest.mark.parametrize("kind,overrides", ALL_KINDS)
def test_config_dict_round_trip(kind, overrides):
    config = make_config(kind, **overrides)
    data = json.loads(json.dumps(config.to_dict()))
    assert AdapterConfig.from_dict(data) == config
    assert build_adapter(data).config == config


def test_eagle_config_defaults():
    config = AdapterConfig(kind="eagle", d_draft=4096, d_target=4096, vocab_size=32064)
    assert config.num_heads == 64 and config.head_dim == 64
    assert config.embed_dim == 4096 and config.intermediate_size == 8192
    assert AdapterConfig(kind="bottleneck", d_draft=8, d_target=8).rank == 256


@pytest.mark.parametrize("kind,overrides", ALL_KINDS)
def test_determinism_with_seed(kind, overrides):
    def build(seed):
        torch.manual_seed(seed)
        return build_adapter(make_config(kind, **overrides)).eval()

    first, second, other = build(123), build(123), build(124)
    hidden, kwargs = make_inputs(first)
    assert torch.equal(first(hidden, **kwargs), second(hidden, **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first(hidden, **kwargs), other(hidden, **kwargs))


# ------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="conv", d_draft=8, d_target=8), "kind must be one of"),
        (dict(kind="linear", d_draft=0, d_target=8), "d_draft must be a positive int"),
        (dict(kind="linear", d_draft=8, d_target=-3), "d_target must be a positive int"),
        (dict(kind="linear", d_draft=8.0, d_target=8), "d_draft must be a positive int"),
        (dict(kind="bottleneck", d_draft=8, d_target=8, rank=0), "rank must be a positive int"),
        (dict(kind="bottleneck", d_draft=True, d_target=8), "d_draft must be a positive int"),
        (dict(kind="eagle", d_draft=8, d_target=8), "needs vocab_size"),
        (dict(kind="eagle", d_draft=8, d_target=8, vocab_size=0), "needs vocab_size"),
        (dict(kind="eagle", d_draft=8, d_target=48, vocab_size=5, num_heads=5), "num_heads must be"),
        (dict(kind="eagle", d_draft=8, d_target=48, vocab_size=5, num_heads=16), "head_dim .* must be even"),
        (dict(kind="eagle", d_draft=8, d_target=8, vocab_size=5, intermediate_size=0), "intermediate_size"),
        (dict(kind="linear", d_draft=8, d_target=8, norm_eps=0.0), "norm_eps must be a positive number"),
        (
            dict(kind="eagle", d_draft=8, d_target=8, vocab_size=5, use_target_hidden=1),
            "use_target_hidden must be a bool",
        ),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)


def test_bad_config_dict():
    with pytest.raises(ValueError, match="unknown keys \\['hidden'\\]"):
        AdapterConfig.from_dict({"kind": "linear", "d_draft": 8, "d_target": 8, "hidden": 3})
    with pytest.raises(ValueError, match="missing required keys \\['d_target'\\]"):
        AdapterConfig.from_dict({"kind": "linear", "d_draft": 8})
    with pytest.raises(ValueError, match="expected a dict"):
        AdapterConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="config.kind must be 'linear'"):
        LinearAdapter(make_config("bottleneck"))
    with pytest.raises(ValueError, match="config must be an AdapterConfig"):
        BottleneckAdapter({"kind": "bottleneck", "d_draft": 8, "d_target": 8})


@pytest.mark.parametrize("kind,overrides", ALL_KINDS)
def test_wrong_hidden_dims(kind, overrides):
    adapter = make_adapter(kind, **overrides)
    _, kwargs = make_inputs(adapter, lead=(2, 3))
    with pytest.raises(
        ValueError, match="drafter_hidden must be \\[..., d_draft=40\\], got shape \\(2, 3, 41\\)"
    ):
        adapter(torch.randn(2, 3, 41), **kwargs)
    with pytest.raises(ValueError, match="drafter_hidden must be floating point"):
        adapter(torch.zeros(2, 3, 40, dtype=torch.int64), **kwargs)
    with pytest.raises(ValueError, match="drafter_hidden must be \\[..., d_draft=40\\], got shape \\(\\)"):
        adapter(torch.tensor(1.0), **kwargs)


def test_eagle_bad_inputs():
    adapter = make_adapter("eagle")
    hidden = torch.randn(2, 3, 40)
    tokens = torch.randint(0, VOCAB, (2, 3))
    with pytest.raises(ValueError, match="prev_tokens is required"):
        adapter(hidden)
    with pytest.raises(ValueError, match="prev_tokens must have shape .*\\(2, 3\\), got \\(2, 4\\)"):
        adapter(hidden, prev_tokens=torch.randint(0, VOCAB, (2, 4)))
    with pytest.raises(ValueError, match="prev_tokens must be an integer tensor"):
        adapter(hidden, prev_tokens=tokens.float())
    with pytest.raises(
        ValueError, match="prev_tokens must be in \\[0, vocab_size=97\\), got values in \\[-1,"
    ):
        adapter(hidden, prev_tokens=torch.full((2, 3), -1))
    with pytest.raises(ValueError, match="got values in \\[97, 97\\]"):
        adapter(hidden, prev_tokens=torch.full((2, 3), VOCAB))
    with pytest.raises(ValueError, match="target_hidden was given but config.use_target_hidden=False"):
        adapter(hidden, prev_tokens=tokens, target_hidden=torch.randn(2, 3, 48))

    fused = make_adapter("eagle", use_target_hidden=True)
    with pytest.raises(ValueError, match="target_hidden is required when config.use_target_hidden=True"):
        fused(hidden, prev_tokens=tokens)
    with pytest.raises(ValueError, match="target_hidden must have shape \\(2, 3, 48\\), got \\(2, 3, 40\\)"):
        fused(hidden, prev_tokens=tokens, target_hidden=torch.randn(2, 3, 40))


def test_linear_and_bottleneck_ignore_eagle_inputs():
    for kind in ("linear", "bottleneck"):
        adapter = make_adapter(kind)
        x = torch.randn(2, 40)
        expected = adapter(x)
        got = adapter(x, prev_tokens=torch.zeros(2, dtype=torch.long), target_hidden=torch.randn(2, 48))
        assert torch.equal(got, expected)


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_adapter(tmp_path / "nope")
    make_adapter("linear").save_pretrained(tmp_path)
    os.remove(tmp_path / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match="no adapter.safetensors"):
        load_adapter(tmp_path)
    make_adapter("linear").save_pretrained(tmp_path)
    os.remove(tmp_path / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(tmp_path)


def test_load_corrupt_files(tmp_path):
    make_adapter("bottleneck").save_pretrained(tmp_path)
    weights = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_adapter(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_adapter(tmp_path)

    make_adapter("bottleneck").save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_adapter(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_adapter(tmp_path)


def _edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_load_invalid_config_values(tmp_path):
    make_adapter("linear").save_pretrained(tmp_path)
    _edit_config(tmp_path, d_draft=-1)
    with pytest.raises(ValueError, match="invalid config in .*d_draft must be a positive int"):
        load_adapter(tmp_path)
    make_adapter("linear").save_pretrained(tmp_path)
    _edit_config(tmp_path, format_version=99)
    with pytest.raises(ValueError, match="format_version 99, expected 1"):
        load_adapter(tmp_path)


def test_load_shape_mismatch(tmp_path):
    make_adapter("bottleneck").save_pretrained(tmp_path)
    _edit_config(tmp_path, rank=13)
    with pytest.raises(
        ValueError, match="shape mismatch for 'down.weight': file has \\(12, 40\\).* expects \\(13, 40\\)"
    ):
        load_adapter(tmp_path)


def test_load_key_mismatch(tmp_path):
    # A bottleneck saved with d_draft != d_target has proj.weight; claiming d_draft == d_target drops it.
    make_adapter("bottleneck", d_draft=40, d_target=48).save_pretrained(tmp_path)
    _edit_config(tmp_path, kind="linear")
    with pytest.raises(ValueError, match="does not match the 'linear' config: missing keys \\['linear.bias'"):
        load_adapter(tmp_path)


def test_load_wrong_kind_for_class(tmp_path):
    make_adapter("linear").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'linear' adapter, expected 'eagle'"):
        EagleAdapter.from_pretrained(tmp_path)


def test_save_requires_config(tmp_path):
    with pytest.raises(ValueError, match="must have an AdapterConfig in .config"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)


def test_save_onto_a_file_names_the_path_and_argument(tmp_path):
    """A file where the directory should be used to raise a raw FileExistsError from os.makedirs."""
    adapter = build_adapter(AdapterConfig("linear", 8, 12))
    a_file = tmp_path / "adapter.bin"
    a_file.write_bytes(b"not a directory")
    with pytest.raises(
        ValueError, match=r"save_pretrained: directory '.*adapter\.bin' exists and is not a directory"
    ):
        save_pretrained(adapter, a_file)
    with pytest.raises(ValueError, match=r"save_pretrained: directory '.*adapter\.bin' exists"):
        adapter.save_pretrained(str(a_file))
    with pytest.raises(ValueError, match=r"save_pretrained: cannot create directory '.*adapter\.bin.sub'"):
        save_pretrained(adapter, a_file / "sub")
    assert a_file.read_bytes() == b"not a directory"  # left untouched
    save_pretrained(adapter, tmp_path / "fresh" / "nested")  # new directories are still created
    assert (tmp_path / "fresh" / "nested" / WEIGHTS_NAME).is_file()


def test_gradients_flow():
    for kind, overrides in (
        ("linear", {}),
        ("bottleneck", {}),
        ("eagle", {"use_target_hidden": True}),
        ("stacked_bottleneck", {}),
    ):
        adapter = make_adapter(kind, **overrides).train()
        hidden, kwargs = make_inputs(adapter)
        loss = F.mse_loss(adapter(hidden, **kwargs), torch.zeros(3, 7, 48))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())


# ------------------------------------------------------------------------------------------------
# L2 stacked bottleneck, L4 attention adapter, research labels and sizes


def test_stacked_bottleneck_is_its_blocks_in_sequence():
    adapter = make_adapter("stacked_bottleneck", num_layers=3)
    assert type(adapter) is StackedBottleneckAdapter and len(adapter.blocks) == 3
    assert [b.config.d_draft for b in adapter.blocks] == [40, 48, 48]
    assert adapter.blocks[0].proj is not None and adapter.blocks[1].proj is None
    hidden = torch.randn(5, 40)
    want = adapter.blocks[2](adapter.blocks[1](adapter.blocks[0](hidden)))
    torch.testing.assert_close(adapter(hidden), want, rtol=0, atol=0)
    assert not hasattr(adapter, "fused_params")  # a stack is not one fusable bottleneck


def attention_by_hand(adapter, hidden, context):
    """The L4 block written out for one position: softmax attention over [context ; current]."""
    cfg = adapter.config
    x = adapter.in_proj(hidden) + adapter.distance_embed[0]
    keys = [x]
    if context is not None:
        width = context.shape[0]
        keys = [adapter.in_proj(context[j]) + adapter.distance_embed[width - j] for j in range(width)] + keys
    normed = adapter.attn_norm(torch.stack(keys))
    heads, head_dim = cfg.num_heads, cfg.d_target // cfg.num_heads
    q = adapter.q_proj(normed[-1]).view(heads, head_dim)
    k = adapter.k_proj(normed).view(-1, heads, head_dim)
    v = adapter.v_proj(normed).view(-1, heads, head_dim)
    weights = torch.softmax(torch.einsum("hd,shd->hs", q, k) / math.sqrt(head_dim), dim=-1)
    y = x + adapter.o_proj(torch.einsum("hs,shd->hd", weights, v).reshape(-1))
    return y + adapter.fc2(F.gelu(adapter.fc1(adapter.mlp_norm(y))))


def test_attention_adapter_matches_formula():
    adapter = make_adapter("attention", window=4, intermediate_size=24, num_heads=4)
    assert type(adapter) is AttentionAdapter
    hidden, context = torch.randn(40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    adapter = adapter.double()
    torch.testing.assert_close(adapter(hidden), attention_by_hand(adapter, hidden, None))
    torch.testing.assert_close(adapter(hidden, context=context), attention_by_hand(adapter, hidden, context))


def test_attention_adapter_window_degenerates_to_current_position():
    adapter = make_adapter("attention", window=4, intermediate_size=24)
    hidden, context = torch.randn(2, 5, 40), torch.randn(2, 5, 3, 40)
    alone = adapter(hidden)  # what an engine holding only the current position runs
    assert alone.shape == (2, 5, 48)
    assert not torch.allclose(adapter(hidden, context=context), alone)
    torch.testing.assert_close(adapter(hidden, context=context[..., :0, :]), alone)
    absent = torch.zeros(2, 5, 3, dtype=torch.bool)
    torch.testing.assert_close(adapter(hidden, context=context, context_mask=absent), alone)
    # A masked-out state counts as absent: masking the oldest equals passing the two newest...
    mask = torch.ones(2, 5, 3, dtype=torch.bool)
    mask[..., 0] = False
    torch.testing.assert_close(
        adapter(hidden, context=context, context_mask=mask), adapter(hidden, context=context[..., 1:, :])
    )


def test_attention_adapter_bad_context():
    adapter = make_adapter("attention", window=2, intermediate_size=24)
    hidden = torch.randn(3, 40)
    with pytest.raises(ValueError, match="W <= window=2, got shape \\(3, 3, 40\\)"):
        adapter(hidden, context=torch.randn(3, 3, 40))
    with pytest.raises(ValueError, match="leading dims \\(3,\\)"):
        adapter(hidden, context=torch.randn(4, 2, 40))
    with pytest.raises(ValueError, match="context must be \\[..., d_draft=40\\]"):
        adapter(hidden, context=torch.randn(3, 2, 41))
    with pytest.raises(ValueError, match="context_mask must be a bool tensor of shape \\(3, 2\\)"):
        adapter(hidden, context=torch.randn(3, 2, 40), context_mask=torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="context_mask was given without context"):
        adapter(hidden, context_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        make_config("attention", window=-1)


# The table: label -> parameters (millions) at d = 4096; sizes within 5 %.
RESEARCH_TABLE = {"L1": 2.1, "L2": 6.3, "L3": 16.0, "L4": 101.0, "L5": 103.0, "B1": 103.0, "L5F": 170.0}


@pytest.mark.parametrize("label", sorted(RESEARCH_TABLE))
def test_research_adapter_sizes_at_4096(label):
    with torch.device("meta"):  # no memory: only the shapes are built
        adapter = build_adapter(research_adapter_config(label))
    assert adapter.config.label == label and adapter.config.d_target == 4096
    millions = num_parameters(adapter) / 1e6
    assert abs(millions - RESEARCH_TABLE[label]) / RESEARCH_TABLE[label] < 0.05, millions
    assert set(RESEARCH_TABLE) == set(RESEARCH_ADAPTERS)


def test_research_config_other_shapes_and_errors():
    config = research_adapter_config("L5F", d=64, vocab=50, num_heads=4)
    assert (config.kind, config.d_draft, config.vocab_size, config.num_heads) == ("l5f", 64, 50, 4)
    assert research_adapter_config("L2", d=16).num_layers == 3
    with pytest.raises(ValueError, match="label must be one of"):
        research_adapter_config("L6")


@pytest.mark.parametrize(
    "kwargs,label",
    [
        (dict(kind="bottleneck", rank=16), None),
        (dict(kind="bottleneck", rank=16, label="L3"), "L3"),
        (dict(kind="stacked_bottleneck"), "L2"),
        (dict(kind="attention"), "L4"),
        (dict(kind="eagle", vocab_size=5), "L5"),
        (dict(kind="eagle", vocab_size=5, use_target_hidden=True), "L5F"),
    ],
)
def test_labels_default_and_reach_the_json(tmp_path, kwargs, label):
    adapter = build_adapter(AdapterConfig(d_draft=16, d_target=16, **kwargs))
    assert adapter.config.label == label
    adapter.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["label"] == label
    assert load_adapter(tmp_path).config.label == label


def test_bad_labels():
    with pytest.raises(ValueError, match="label must be one of"):
        AdapterConfig(kind="bottleneck", d_draft=8, d_target=8, label="L9")
    with pytest.raises(ValueError, match="label 'L4' names kind 'attention', got kind 'bottleneck'"):
        AdapterConfig(kind="bottleneck", d_draft=8, d_target=8, label="L4")
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        AdapterConfig(kind="stacked_bottleneck", d_draft=8, d_target=8, num_layers=0)
