"""EventGPT-style drafter (crossspec_kernels.models.eventgpt): tiny random models, no downloads.

Covers the token layout, the placeholder splice, greedy generation against hand-written loops (with
and without a KV cache, batch 2 with left padding), save/load, the original-checkpoint converter, the
"crossspec" tree attention through hf.enable against root-path forwards, preset sizes on the meta
device, preprocessing, prompts and bad inputs. Runs on transformers 5.x and 4.57.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from crossspec_kernels import hf, hf_attention  # noqa: E402
from crossspec_kernels.models.eventgpt import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    EventGPTConfig,
    EventGPTForCausalLM,
    EventGPTPromptBuilder,
    aggregate_event_features,
    build_prompt_ids,
    eventgpt_config,
    eventgpt_parameter_counts,
    format_prompt,
    preprocess_event_frames,
)
from crossspec_kernels.models.eventgpt_convert import (  # noqa: E402
    convert_eventgpt_state_dict,
    to_original_state_dict,
)
from crossspec_kernels.testing_models import VOCAB_SIZE  # noqa: E402

ATOL = 2e-5  # fp32, same weights: differences are summation order only
FRAMES, IMAGE = 5, 16
TINY_EVENT_TOKENS = 5 * 4 + 5 + 4  # N*P + N + P with P = (16 / 8)^2 patches


def tiny_drafter(seed: int = 0, attn: str = "eager", initializer_range: float = 0.1, **overrides):
    """fp32 tiny drafter in eval mode; weights larger than HF's default give peaky attention/logits."""
    config = eventgpt_config("tiny", **overrides)
    config.text_config.initializer_range = initializer_range
    torch.manual_seed(seed)
    model = EventGPTForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # never stop early: loops below run a fixed length
    return model


def event_pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def question(length: int, seed: int) -> list[int]:
    return torch.randint(3, 100, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompts(model, lengths=(4, 2), seed=0):
    """Left-padded (input_ids, attention_mask) and the unpadded rows."""
    builder = EventGPTPromptBuilder(model.config, newline_ids=[13], end_ids=[70, 71])
    questions = [question(n, seed + row) for row, n in enumerate(lengths)]
    input_ids, attention_mask = builder.batch(questions)
    return input_ids, attention_mask, [builder(q) for q in questions]


def assert_close(actual, expected, what, atol=ATOL):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max |diff| = {err:.3g} > {atol}"


# ----------------------------------------------------------------------------------------------
# Shapes, layout, splice
# ----------------------------------------------------------------------------------------------


def test_forward_shapes_and_final_hidden_state():
    model = tiny_drafter()
    input_ids, attention_mask, _ = prompts(model)
    pixels = event_pixels(2)
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            event_pixel_values=pixels,
            output_hidden_states=True,
        )
        base = model.model(input_ids=input_ids, attention_mask=attention_mask, event_pixel_values=pixels)
        events = model.encode_events(pixels)
    batch, length = input_ids.shape
    assert out.logits.shape == (batch, length, VOCAB_SIZE)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (batch, length, 64)
    # The engine's contract: hidden_states[-1] is the final-norm state that lm_head reads.
    assert_close(out.hidden_states[-1], base.last_hidden_state, "hidden_states[-1] vs last_hidden_state")
    assert_close(model.lm_head(out.hidden_states[-1]), out.logits, "lm_head(hidden_states[-1])")
    assert events.shape == (2, TINY_EVENT_TOKENS, 64)
    assert out.past_key_values is not None
    assert model.get_input_embeddings() is model.model.language_model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head


def test_token_counts_of_presets_and_layouts():
    tiny = eventgpt_config("tiny")
    assert (tiny.num_frames, tiny.tokens_per_frame, tiny.num_event_tokens) == (5, 4, TINY_EVENT_TOKENS)
    assert tiny.event_token_index == VOCAB_SIZE  # one past the vocabulary: never generated
    assert eventgpt_config("tiny", original_layout=True).num_event_tokens == 5 + 5  # N + (P + CLS)
    assert eventgpt_config("tiny", include_frame_tokens=False).num_event_tokens == 5 + 4
    assert eventgpt_config("7b").num_event_tokens == 5 + 257  # the original layout by default
    assert eventgpt_config("7b", original_layout=False).num_event_tokens == 5 * 256 + 5 + 256
    assert eventgpt_config("1b", num_frames=8, original_layout=False).num_event_tokens == 8 * 256 + 8 + 256
    assert eventgpt_config("1b", num_frames=8).num_event_tokens == 8 + 257


def test_aggregation_layout():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 4, 6, generator=gen)  # B, N, P, H
    out = aggregate_event_features(features)
    assert out.shape == (2, 3 * 4 + 3 + 4, 6)
    for frame in range(3):
        assert torch.equal(out[:, frame * 4 : (frame + 1) * 4], features[:, frame])
        assert_close(out[:, 12 + frame], features[:, frame].mean(dim=1), f"frame {frame} mean token")
    for patch in range(4):
        assert_close(out[:, 15 + patch], features[:, :, patch].mean(dim=1), f"patch {patch} temporal mean")
    short = aggregate_event_features(features, include_frame_tokens=False)
    assert torch.equal(short, out[:, 12:])


def test_placeholders_are_replaced_by_event_tokens_in_order():
    model = tiny_drafter()
    input_ids, attention_mask, _ = prompts(model)
    pixels = event_pixels(2, seed=3)
    is_event = input_ids == model.config.event_token_index
    assert is_event.sum(-1).tolist() == [TINY_EVENT_TOKENS] * 2
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids.masked_fill(is_event, 0))
        embeds[is_event] = model.encode_events(pixels).reshape(-1, 64)
        by_hand = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
        ours = model(input_ids=input_ids, attention_mask=attention_mask, event_pixel_values=pixels).logits
        features = model(
            input_ids=input_ids, attention_mask=attention_mask, event_features=model.encode_events(pixels)
        ).logits
        other = model(
            input_ids=input_ids, attention_mask=attention_mask, event_pixel_values=event_pixels(2, 4)
        )
    real = attention_mask.bool()
    assert_close(ours[real], by_hand[real], "splice vs hand-made inputs_embeds")
    assert_close(features[real], ours[real], "precomputed event_features")
    assert (other.logits[real] - ours[real]).abs().max() > 1e-3  # the events do matter


def test_labels_give_the_shifted_cross_entropy():
    model = tiny_drafter()
    input_ids, _, _ = prompts(model, lengths=(5,))
    pixels = event_pixels(1)
    labels = input_ids.clone()  # placeholders in the labels are ignored automatically
    with torch.no_grad():
        out = model(input_ids=input_ids, event_pixel_values=pixels, labels=labels)
    keep = labels[0, 1:] != model.config.event_token_index
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1][keep], labels[0, 1:][keep])
    assert_close(out.loss, expected, "loss", atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------

STEPS = 6


def test_generate_equals_manual_cached_loop_and_recompute():
    model = tiny_drafter(seed=1)
    input_ids, _, _ = prompts(model, lengths=(4,), seed=5)
    pixels = event_pixels(1, seed=5)
    with torch.no_grad():
        generated = model.generate(
            input_ids=input_ids,
            event_pixel_values=pixels,
            max_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
        )[:, input_ids.shape[1] :]

        out = model(input_ids=input_ids, event_pixel_values=pixels, use_cache=True)
        cached, cache = [out.logits[:, -1].argmax(-1)], out.past_key_values
        for _ in range(STEPS - 1):  # events on the prefill only; the placeholders live in the cache
            out = model(input_ids=cached[-1][:, None], past_key_values=cache, use_cache=True)
            cached.append(out.logits[:, -1].argmax(-1))
            cache = out.past_key_values
        cached = torch.stack(cached, dim=1)

        sequence = input_ids
        for _ in range(STEPS):
            logits = model(input_ids=sequence, event_pixel_values=pixels, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        recomputed = sequence[:, input_ids.shape[1] :]
    assert torch.equal(generated, cached)
    assert torch.equal(generated, recomputed)


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = tiny_drafter(seed=2)
    input_ids, attention_mask, rows = prompts(model, lengths=(6, 2), seed=7)
    pixels = event_pixels(2, seed=7)
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, event_pixel_values=pixels, **kwargs
        )[:, input_ids.shape[1] :]
        for row, ids in enumerate(rows):
            alone = model.generate(input_ids=ids[None], event_pixel_values=pixels[row : row + 1], **kwargs)
            assert torch.equal(batched[row], alone[0, len(ids) :]), f"row {row}"


# ----------------------------------------------------------------------------------------------
# Save / load, Auto classes, converter
# ----------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_drafter(seed=3, num_frames=3)
    model.save_pretrained(tmp_path)
    loaded = EventGPTForCausalLM.from_pretrained(tmp_path).eval()
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, EventGPTConfig) and isinstance(auto, EventGPTForCausalLM)
    assert config.num_frames == 3 and config.num_event_tokens == model.config.num_event_tokens
    assert config.text_config.to_dict()["hidden_size"] == 64 and config.vision_config.patch_size == 8
    input_ids, attention_mask, _ = prompts(model)
    pixels = torch.randn(2, 3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, event_pixel_values=pixels).logits
        for other in (loaded, auto):
            other.set_attn_implementation("eager")  # the saved config holds no implementation: sdpa
            got = other(input_ids=input_ids, attention_mask=attention_mask, event_pixel_values=pixels).logits
            assert torch.equal(got, expected)


def test_converter_round_trip(tmp_path):
    from safetensors.torch import save_file

    source = tiny_drafter(seed=4)
    original = to_original_state_dict(source.state_dict())
    layers = source.config.text_config.num_hidden_layers
    for name in (
        "model.embed_tokens.weight",
        f"model.layers.{layers - 1}.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.visual_tower.visual_tower.vision_model.embeddings.patch_embedding.weight",
        "model.visual_tower.visual_tower.vision_model.post_layernorm.bias",
        "model.visual_projector.0.weight",
        "model.visual_projector.2.bias",
        "model.feature_adaptor.weight",
    ):
        assert name in original, name
    # Buffers older transformers saved are tolerated.
    original["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    converted = convert_eventgpt_state_dict(original, source.config)
    assert set(converted) == set(source.state_dict())

    input_ids, attention_mask, _ = prompts(source)
    pixels = event_pixels(2, seed=9)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, event_pixel_values=pixels)
    with torch.no_grad():
        expected = source(**inputs).logits
        from_dict = EventGPTForCausalLM.from_original_checkpoint(original, source.config)
        from_dict.set_attn_implementation("eager")
        assert torch.equal(from_dict(**inputs).logits, expected)

        # A checkpoint directory without its CLIP tower, plus the tower from a separate CLIP state dict.
        tower = "model.visual_tower.visual_tower.vision_model."
        save_file(
            {k: v.contiguous() for k, v in original.items() if not k.startswith(tower)},
            tmp_path / "a.safetensors",
        )
        clip = {"vision_model." + k[len(tower) :]: v for k, v in original.items() if k.startswith(tower)}
        clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(
            3, 2
        )  # a full CLIPModel's text side
        from_dir = EventGPTForCausalLM.from_original_checkpoint(
            tmp_path, source.config, vision_tower_state_dict=clip
        )
        from_dir.set_attn_implementation("eager")
        assert torch.equal(from_dir(**inputs).logits, expected)


# ----------------------------------------------------------------------------------------------
# hf.enable: tree attention through the drafter
# ----------------------------------------------------------------------------------------------

PARENTS = [-1, 0, 0, 1, 1, 2, 3, 0]  # root (the last committed token) first


def tree_mask_and_depth(parents):
    nodes = len(parents)
    mask = torch.zeros(nodes, nodes, dtype=torch.bool)
    depth = torch.zeros(nodes, dtype=torch.int64)
    for i, parent in enumerate(parents):
        mask[i, i] = True
        if parent >= 0:
            mask[i] |= mask[parent]
            depth[i] = depth[parent] + 1
    return mask, depth


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    op = hf_attention._tree_attention_op

    def spy(q, k, v, tree_mask=None, **kwargs):
        calls.append(dict(queries=q.shape[2], tree=tree_mask is not None))
        return op(q, k, v, tree_mask, **kwargs)

    monkeypatch.setattr(hf_attention, "_tree_attention_op", spy)
    return calls


def test_hf_enable_tree_forward_equals_root_path_forwards(kernel_calls):
    eager = tiny_drafter(seed=5)
    ours = hf.enable(copy.deepcopy(eager))
    assert ours.config.text_config._attn_implementation == "crossspec"
    assert ours.model.language_model.config._attn_implementation == "crossspec"
    assert ours.model.vision_tower.config._attn_implementation == "eager"  # the CLIP tower keeps its own

    input_ids, attention_mask, rows = prompts(eager, lengths=(5, 2), seed=11)
    pixels = event_pixels(2, seed=11)
    tree, depth = tree_mask_and_depth(PARENTS)
    gen = torch.Generator().manual_seed(12)
    tree_tokens = torch.randint(3, 100, (2, len(PARENTS)), generator=gen)
    real = attention_mask.sum(-1, keepdim=True)
    with torch.no_grad():
        prefill = ours(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            event_pixel_values=pixels,
            use_cache=True,
        )
        kernel_calls.clear()
        step = ours(
            input_ids=tree_tokens,
            attention_mask=torch.cat([attention_mask, torch.ones_like(tree_tokens)], dim=1),
            position_ids=real + depth,
            past_key_values=copy.deepcopy(prefill.past_key_values),  # a step appends to it
            crossspec_tree_mask=tree,
            output_hidden_states=True,
        )
        assert [call["tree"] for call in kernel_calls] == [True] * eager.config.text_config.num_hidden_layers
        events = eager.encode_events(pixels)  # once, not once per root path
        for row, ids in enumerate(rows):
            for node in range(len(PARENTS)):
                path = tree[node].nonzero().flatten()
                sequence = torch.cat([ids, tree_tokens[row, path]])[None]
                expected = eager(
                    input_ids=sequence, event_features=events[row : row + 1], output_hidden_states=True
                )
                assert_close(step.logits[row, node], expected.logits[0, -1], f"row {row} node {node} logits")
                assert_close(
                    step.hidden_states[-1][row, node],
                    expected.hidden_states[-1][0, -1],
                    f"row {row} node {node}",
                )
        # The sync-free form: no 2-D mask, the left padding as crossspec_kv_start.
        by_kv_start = ours(
            input_ids=tree_tokens,
            position_ids=real + depth,
            past_key_values=copy.deepcopy(prefill.past_key_values),  # a step appends to it
            crossspec_tree_mask=tree,
            crossspec_kv_start=(attention_mask == 0).sum(-1),
        )
        assert_close(by_kv_start.logits, step.logits, "crossspec_kv_start instead of attention_mask")
        # Without the tree mask the same step is plain causal attention: far from the root paths.
        causal = ours(
            input_ids=tree_tokens,
            attention_mask=torch.cat([attention_mask, torch.ones_like(tree_tokens)], dim=1),
            position_ids=real + depth,
            past_key_values=copy.deepcopy(prefill.past_key_values),  # a step appends to it
        )
        assert (causal.logits - step.logits).abs().max() > 100 * ATOL


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

VICUNA_7B = 6_738_415_616  # LlamaForCausalLM, Vicuna-7B shape
TINYLLAMA = 1_100_048_384  # LlamaForCausalLM, TinyLlama-1.1B shape
CLIP_L14_224 = 303_179_776  # CLIPVisionModel ViT-L/14, 224 px


@pytest.mark.parametrize("name", ["7b", "1b", "tiny"])
def test_preset_parameter_counts_on_meta_device(name):
    config = eventgpt_config(name)
    counts = eventgpt_parameter_counts(config)
    with torch.device("meta"):
        model = EventGPTForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == counts["vision_tower"]
    assert sum(p.numel() for p in model.model.language_model.parameters()) == counts["language_model"]
    if name == "7b":
        assert counts["language_model"] + counts["lm_head"] == VICUNA_7B
        assert counts["vision_tower"] == CLIP_L14_224
        assert 7.0e9 < counts["total"] < 7.2e9
    elif name == "1b":
        assert counts["language_model"] + counts["lm_head"] == TINYLLAMA
        assert counts["vision_tower"] == CLIP_L14_224
        assert 1.3e9 < counts["total"] < 1.5e9


# ----------------------------------------------------------------------------------------------
# Preprocessing and prompts
# ----------------------------------------------------------------------------------------------


def test_preprocess_event_frames():
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 4, 3, 16, 16), dtype=torch.uint8, generator=gen)
    out = preprocess_event_frames(frames, 16)
    assert out.shape == (2, 4, 3, 16, 16) and out.dtype == torch.float32
    assert_close(out, (frames.float() / 255 - mean) / std, "no resize: normalization only", atol=1e-5)

    # Shortest side already 16: a center crop of the 32-wide frame, columns 8..23.
    wide = torch.zeros(1, 3, 16, 32, dtype=torch.uint8)
    wide[..., 16:] = 255
    out = preprocess_event_frames(wide, 16)
    assert_close(out[0, :, :, :8], ((0 - mean) / std).expand(3, 16, 8), "left half of the crop", atol=1e-5)
    assert_close(out[0, :, :, 8:], ((1 - mean) / std).expand(3, 16, 8), "right half of the crop", atol=1e-5)

    # White background (eventgpt representation), any size -> white after resize and crop.
    white = torch.full((3, 3, 40, 30), 255, dtype=torch.uint8)
    out = preprocess_event_frames(white, 16)
    assert out.shape == (3, 3, 16, 16)
    assert_close(out, ((1 - mean) / std).expand(3, 3, 16, 16), "white frames", atol=1e-5)


class WordTokenizer:
    """A stand-in for LlamaTokenizer: one id per whitespace-separated word, BOS = 1."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [
            self.vocab.setdefault(word, 3 + len(self.vocab)) for word in text.replace("\n", " \n ").split(" ")
        ]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_prompt_builder_with_ids_and_with_a_tokenizer():
    config = eventgpt_config("tiny")
    ids = build_prompt_ids([7, 8, 9], config, before_ids=[1, 20, 21], newline_ids=[13], end_ids=[30])
    events = [config.event_token_index] * TINY_EVENT_TOKENS
    assert ids.tolist() == [1, 20, 21] + events + [13, 7, 8, 9, 30]
    assert ids.dtype == torch.int64

    tokenizer = WordTokenizer()
    builder = EventGPTPromptBuilder(config, tokenizer)
    text_ids = builder("What moves?").tolist()
    before = tokenizer(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. USER: "
    )
    assert text_ids[: len(before["input_ids"])] == before["input_ids"]
    assert text_ids.count(config.event_token_index) == TINY_EVENT_TOKENS
    tail = tokenizer("\nWhat moves? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert text_ids[len(before["input_ids"]) + TINY_EVENT_TOKENS :] == tail
    assert format_prompt("What moves?").endswith("USER: <event>\nWhat moves? ASSISTANT:")

    input_ids, attention_mask = builder.batch(["a", "a b c"])
    assert input_ids.shape == attention_mask.shape and attention_mask[0, :2].tolist() == [0, 0]


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_input_model():
    return tiny_drafter(seed=6)


def _call(model, **overrides):
    input_ids, attention_mask, _ = prompts(model)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, event_pixel_values=event_pixels(2))
    inputs.update(overrides)
    with torch.no_grad():
        return model(**inputs)


FORWARD_CASES = {
    "rank": (dict(event_pixel_values=torch.randn(2, 3, IMAGE, IMAGE)), "must be 5-D"),
    "frames": (dict(event_pixel_values=torch.randn(2, 3, 3, IMAGE, IMAGE)), "has 3 frames"),
    "image size": (dict(event_pixel_values=torch.randn(2, FRAMES, 3, 24, 24)), "image size 16"),
    "dtype": (
        dict(event_pixel_values=torch.zeros(2, FRAMES, 3, IMAGE, IMAGE, dtype=torch.uint8)),
        "floating",
    ),
    "batch": (dict(event_pixel_values=event_pixels(1)), "batch 1 != input_ids batch 2"),
    "features shape": (dict(event_pixel_values=None, event_features=torch.randn(2, 7, 64)), r"T_event, H\]"),
    "both event inputs": (dict(event_features=torch.randn(2, TINY_EVENT_TOKENS, 64)), "at most one"),
    "embeds with events": (dict(input_ids=None, inputs_embeds=torch.randn(2, 4, 64)), "need input_ids"),
}


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_bad_forward_inputs_raise(bad_input_model, case):
    overrides, match = FORWARD_CASES[case]
    with pytest.raises(ValueError, match=match):
        _call(bad_input_model, **overrides)


def test_placeholder_count_mismatch_and_missing_events_raise(bad_input_model):
    model = bad_input_model
    input_ids, attention_mask, _ = prompts(model)
    short = input_ids.clone()
    short[1, (short[1] == model.config.event_token_index).nonzero()[0]] = 5  # one placeholder fewer
    with pytest.raises(ValueError, match=r"exactly T_event = 29 times .* got counts \[29, 28\]"):
        _call(model, input_ids=short)
    with pytest.raises(ValueError, match="no event_pixel_values"):
        _call(model, event_pixel_values=None)
    no_events = input_ids.masked_fill(input_ids == model.config.event_token_index, 5)
    with pytest.raises(ValueError, match=r"got counts \[0, 0\]"):
        _call(model, input_ids=no_events)


def test_bad_configs_presets_and_prompts_raise():
    with pytest.raises(ValueError, match="unknown preset '13b'"):
        eventgpt_config("13b")
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        eventgpt_config("tiny", num_frames=0)
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        eventgpt_config("tiny", vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="vision_feature_layer"):
        eventgpt_config("tiny", vision_feature_layer=7)
    config = eventgpt_config("tiny")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_prompt_ids("what is this?", config)
    with pytest.raises(ValueError, match="contain the event placeholder"):
        build_prompt_ids([3, config.event_token_index], config)


def test_bad_frames_raise():
    with pytest.raises(ValueError, match="must be uint8"):
        preprocess_event_frames(torch.zeros(5, 3, 16, 16), 16)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\] or \[B, N, 3, H, W\]"):
        preprocess_event_frames(torch.zeros(5, 16, 16, dtype=torch.uint8), 16)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        preprocess_event_frames(torch.zeros(5, 3, 16, 16, dtype=torch.uint8), 0)


def test_converter_reports_missing_and_unexpected_keys(bad_input_model):
    original = to_original_state_dict(bad_input_model.state_dict())
    config = bad_input_model.config
    extra = dict(original, **{"model.query_embeddings": torch.zeros(4, 64)})  # the original's Q-Former
    with pytest.raises(ValueError, match=r"unexpected keys \['model.query_embeddings'\]"):
        convert_eventgpt_state_dict(extra, config)
    missing = {k: v for k, v in original.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\]"):
        convert_eventgpt_state_dict(missing, config)
    wrong = dict(original, **{"model.feature_adaptor.weight": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_eventgpt_state_dict(wrong, config)
    with pytest.raises(ValueError, match="missing keys"):
        EventGPTForCausalLM.from_original_checkpoint(missing, config)
