"""Tiny, randomly initialised Hugging Face models built from configs (no downloads), for tests.

The shapes are small enough for a CPU test suite, yet keep what matters to attention: grouped-query
attention (4 query heads over 2 kv heads), more than one layer, RoPE, and, for Video-LLaVA, a video
tower whose frames become placeholder tokens in the language model's sequence. Works with
transformers 4.57 and 5.x.
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 128
PAD_TOKEN_ID = 0
VIDEO_TOKEN_ID = VOCAB_SIZE - 1
IMAGE_TOKEN_ID = VOCAB_SIZE - 2
NUM_FRAMES = 8
IMAGE_SIZE = 16
PATCH_SIZE = 8
# The video tower keeps the CLS token: (16 / 8)^2 patches + 1 per frame.
TOKENS_PER_FRAME = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
VIDEO_TOKENS = NUM_FRAMES * TOKENS_PER_FRAME


def tiny_llama_config(head_dim: int = 16, **overrides):
    """A 2-layer Llama with 4 query heads over 2 kv heads of ``head_dim``, vocabulary 128."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim + 3,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, attn_implementation: str = "eager", **config_overrides):
    """A fp32 ``LlamaForCausalLM`` in eval mode, identical for the same seed and overrides."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def learnable_llama(seed: int = 0):
    """A tiny Llama (vocabulary 64, hidden 32) with sharpened logits and no end of sequence: its
    greedy continuations are varied yet regular enough that a small draft head learns them in
    seconds, and every continuation runs its full length."""
    model = tiny_llama(seed, head_dim=8, vocab_size=64, eos_token_id=None, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def tiny_video_llava_config(head_dim: int = 16, **text_overrides):
    from transformers import CLIPVisionConfig, VideoLlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    return VideoLlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(head_dim=head_dim, **text_overrides),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        video_seq_length=VIDEO_TOKENS,
        image_seq_length=TOKENS_PER_FRAME - 1,
    )


def tiny_video_llava(seed: int = 0, attn_implementation: str = "eager", head_dim: int = 16, **text_overrides):
    """A fp32 ``VideoLlavaForConditionalGeneration`` in eval mode; the vision towers stay on eager.

    ``text_overrides`` go to the language model's LlamaConfig.
    """
    from transformers import VideoLlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(
        tiny_video_llava_config(head_dim=head_dim, **text_overrides)
    ).eval()
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "eager"})
    return model


def tiny_video(batch: int, seed: int = 0) -> torch.Tensor:
    """``pixel_values_videos`` [B, frames, 3, H, W] for :func:`tiny_video_llava`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)


def video_prompt(text_before: int, text_after: int, seed: int = 0) -> torch.Tensor:
    """Token ids [text_before + VIDEO_TOKENS + text_after]: text, the video placeholders, text."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN_ID, (text_before + text_after,), generator=gen)
    video = torch.full((VIDEO_TOKENS,), VIDEO_TOKEN_ID)
    return torch.cat([text[:text_before], video, text[text_before:]])


def left_pad(sequences: list[torch.Tensor], pad_id: int = PAD_TOKEN_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into (input_ids [B, T], attention_mask [B, T] int64)."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = seq
        attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


def video_batch() -> dict:
    """The engine tests' batch: two left-padded video prompts of different lengths, with videos."""
    ids, mask = left_pad([video_prompt(3, 5, seed=0), video_prompt(1, 2, seed=1)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=tiny_video(2, seed=3))


def single_row(inputs: dict, row: int) -> dict:
    """Row ``row`` of a :func:`video_batch`-style batch on its own, without its padding."""
    mask = inputs["attention_mask"][row].bool()
    return dict(
        input_ids=inputs["input_ids"][row][mask][None],
        attention_mask=torch.ones(1, int(mask.sum()), dtype=torch.int64),
        pixel_values_videos=inputs["pixel_values_videos"][row : row + 1],
    )


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """``model`` with relative Gaussian noise on every weight (in place): a drafter that often agrees."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=gen)
            parameter.add_(noise * scale * parameter.std().clamp_min(1e-3))
    return model


def coupled_target_alone(
    model: torch.nn.Module, inputs: dict, seed, temperature: float, max_new_tokens: int
) -> torch.Tensor:
    """The new tokens [B, N] of ``model`` sampling alone under the coupled race
    (``runtime.sampling.CoupledSampling``, end of sequence off): what a coupled engine run must equal."""
    from transformers import LogitsProcessorList

    from crossspec_kernels.runtime.sampling import CoupledSampling

    width = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([CoupledSampling(seed, temperature, width)]),
        eos_token_id=None,
    )
    return out[:, width:]
