"""EventGPT-style drafter built only from Hugging Face classes (no remote code, no downloads).

Architecture (EventGPT, Liu et al. 2024, re-expressed with stock HF modules)::

    event frames [B, N, 3, S, S]
      -> CLIPVisionModel (hidden state ``vision_feature_layer``; CLS dropped unless strategy "full")
      -> projector  Linear(vision hidden, H) - GELU - Linear(H, H)            (``multi_modal_projector``)
      -> feature adaptor Linear(H, H)                                          (``feature_adaptor``)
      -> spatio-temporal aggregation  [B, N, P, H] -> [B, T_event, H]        (:func:`aggregate_event_features`)
      -> spliced into the token embeddings of a LlamaModel at the event placeholders -> lm_head

Event token layout (``T_event = config.num_event_tokens``), P = patch tokens per frame
((S / patch)^2, plus 1 with ``vision_feature_select_strategy="full"``), N = ``num_frames``::

    [ frame 0: P patch tokens | ... | frame N-1: P patch tokens ]   N*P  (only if include_frame_tokens)
    [ mean over frame n's P tokens, n = 0..N-1 ]                         N    ("temporal" tokens)
    [ mean over the N frames of patch token p, p = 0..P-1 ]              P    ("spatial" tokens)

    T_event = (N*P if include_frame_tokens else 0) + N + P
    224 px, patch 14, N = 5, per-frame layout: 5*256 + 5 + 256 = 1541;  tiny (16 px, patch 8): 5*4 + 5 + 4 = 29.

The original EventGPT uses the last two blocks only (``include_frame_tokens=False``), keeps the CLS
token (strategy "full") and takes CLIP's last hidden state (``vision_feature_layer=-1``): N + 257 = 262
tokens for 5 frames. The 7b/1b presets default to exactly that (``original_layout=True``), the layout an
original checkpoint (see :mod:`crossspec_kernels.models.eventgpt_convert`) was trained with and the one
the research timed (a short event prompt leaves the drafter more of the target's prefill to draft in);
``original_layout=False`` gives the per-frame layout (1,541 tokens). "tiny" defaults to per-frame.

Placeholder convention (the HF >= 4.47 / 5.x LLaVA style): the prompt holds the event placeholder id
``config.event_token_index`` repeated ``T_event`` times, one per event token, so the prompt length is
the true sequence length (positions, attention masks and KV caches need no bookkeeping). The forward
embeds every other id and writes the aggregated event features over the placeholders, in order.
``event_token_index`` defaults to ``text_config.vocab_size`` (one past the vocabulary): the LM head can
never produce it, so generated tokens are never mistaken for placeholders (it is never embedded).

Prompt (Vicuna v1, what EventGPT was trained with)::

    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
     detailed, and polite answers to the human's questions. USER: <event>\\n{question} ASSISTANT:"

:class:`EventGPTPromptBuilder` turns it into ids: ``<event>`` becomes T_event placeholders; the text
around it is tokenized in two chunks (before / after the placeholder), as LLaVA's
``tokenizer_image_token`` does. With a real tokenizer::

    from transformers import LlamaTokenizer
    tokenizer = LlamaTokenizer.from_pretrained("/models/vicuna-7b-v1.5")   # a local directory
    builder = EventGPTPromptBuilder(model.config, tokenizer=tokenizer)
    input_ids, attention_mask = builder.batch(["What is happening?", "Describe the scene."])

Without a tokenizer pass token ids (``builder(question_ids)``) and the ids of the template pieces
(``before_ids``, ``newline_ids``, ``end_ids``).

Engine contract (``CrossSpecEngine(target, drafter, ...)``):

* ``drafter_inputs = {"input_ids": [B, T] (placeholders expanded, left padded), "attention_mask": [B, T],
  "event_pixel_values": [B, N, 3, S, S] float}``; event features are used on the prefill only.
* ``forward(..., output_hidden_states=True).hidden_states[-1]`` is the LM's final-norm hidden state
  [B, T, H] (what ``lm_head`` reads); extra keyword arguments (``crossspec_tree_mask``,
  ``crossspec_kv_start``, ...) reach the Llama attention layers unchanged.
* ``crossspec_kernels.hf.enable(drafter)`` routes only the language model through "crossspec"
  (``text_config`` is a sub config); the CLIP tower keeps eager/sdpa.

Works with transformers 4.57 and 5.x.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationMixin,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "EVENT_PLACEHOLDER",
    "PRESETS",
    "VICUNA_V1_SYSTEM",
    "EventGPTConfig",
    "EventGPTForCausalLM",
    "EventGPTModel",
    "EventGPTPreTrainedModel",
    "EventGPTProjector",
    "EventGPTPromptBuilder",
    "aggregate_event_features",
    "build_prompt_ids",
    "eventgpt_config",
    "eventgpt_parameter_counts",
    "format_prompt",
    "preprocess_event_frames",
    "register_auto_classes",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVENT_PLACEHOLDER = "<event>"
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
PRESETS = ("7b", "1b", "tiny")
_STRATEGIES = ("default", "full")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


class EventGPTConfig(PretrainedConfig):
    """Configuration of :class:`EventGPTForCausalLM`.

    Args:
        vision_config: CLIPVisionConfig (or its dict) of the event-frame encoder.
        text_config: LlamaConfig (or its dict) of the language model.
        num_frames: N, event frames per sample (``event_pixel_values`` is [B, N, 3, S, S]).
        event_token_index: placeholder id in ``input_ids``; default ``text_config.vocab_size``.
        vision_feature_layer: which CLIP hidden state feeds the projector (-2: LLaVA's choice; -1: the
            last, what the original EventGPT uses).
        vision_feature_select_strategy: "default" drops the CLS token, "full" keeps it.
        include_frame_tokens: put every frame's patch tokens before the mean tokens (see the module
            docstring); False gives the original EventGPT layout (N + P tokens).
        projector_hidden_act: activation between the projector's two Linears ("gelu" = nn.GELU()).
        projector_bias: whether the projector Linears have biases.
        use_feature_adaptor: whether the Linear(H, H) feature adaptor follows the projector.
        feature_adaptor_bias: whether the feature adaptor has a bias.
    """

    model_type = "crossspec_eventgpt"
    sub_configs = {"vision_config": CLIPVisionConfig, "text_config": LlamaConfig}

    def __init__(
        self,
        vision_config: CLIPVisionConfig | dict | None = None,
        text_config: LlamaConfig | dict | None = None,
        num_frames: int = 5,
        event_token_index: int | None = None,
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: str = "default",
        include_frame_tokens: bool = True,
        projector_hidden_act: str = "gelu",
        projector_bias: bool = True,
        use_feature_adaptor: bool = True,
        feature_adaptor_bias: bool = True,
        **kwargs,
    ) -> None:
        if vision_config is None:
            vision_config = CLIPVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        if text_config is None:
            text_config = LlamaConfig()
        elif isinstance(text_config, dict):
            text_config = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        if not isinstance(vision_config, CLIPVisionConfig):
            raise ValueError(
                f"EventGPTConfig: vision_config must be a CLIPVisionConfig or dict, got {type(vision_config).__name__}"
            )
        if not isinstance(text_config, LlamaConfig):
            raise ValueError(
                f"EventGPTConfig: text_config must be a LlamaConfig or dict, got {type(text_config).__name__}"
            )
        if not _is_int(num_frames) or num_frames <= 0:
            raise ValueError(f"EventGPTConfig: num_frames must be a positive int, got {num_frames!r}")
        if event_token_index is None:
            event_token_index = text_config.vocab_size
        if not _is_int(event_token_index):
            raise ValueError(f"EventGPTConfig: event_token_index must be an int, got {event_token_index!r}")
        num_layers = vision_config.num_hidden_layers
        if not _is_int(vision_feature_layer) or not -num_layers - 1 <= vision_feature_layer <= num_layers:
            raise ValueError(
                f"EventGPTConfig: vision_feature_layer must be an int in [{-num_layers - 1}, {num_layers}] "
                f"(CLIP has {num_layers} layers + embeddings), got {vision_feature_layer!r}"
            )
        if vision_feature_select_strategy not in _STRATEGIES:
            raise ValueError(
                f"EventGPTConfig: vision_feature_select_strategy must be one of {_STRATEGIES}, "
                f"got {vision_feature_select_strategy!r}"
            )
        if projector_hidden_act not in ACT2FN:
            raise ValueError(
                f"EventGPTConfig: projector_hidden_act {projector_hidden_act!r} is not a transformers activation"
            )
        if vision_config.image_size % vision_config.patch_size:
            raise ValueError(
                f"EventGPTConfig: vision image_size {vision_config.image_size} must be a multiple of patch_size "
                f"{vision_config.patch_size}"
            )
        self.vision_config = vision_config
        self.text_config = text_config
        self.num_frames = num_frames
        self.event_token_index = event_token_index
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.include_frame_tokens = bool(include_frame_tokens)
        self.projector_hidden_act = projector_hidden_act
        self.projector_bias = bool(projector_bias)
        self.use_feature_adaptor = bool(use_feature_adaptor)
        self.feature_adaptor_bias = bool(feature_adaptor_bias)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def tokens_per_frame(self) -> int:
        """P: CLIP tokens kept per frame (patches, plus CLS with strategy "full")."""
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def num_event_tokens(self) -> int:
        """T_event: placeholders per prompt = (N*P if include_frame_tokens) + N + P."""
        frames, per_frame = self.num_frames, self.tokens_per_frame
        return (frames * per_frame if self.include_frame_tokens else 0) + frames + per_frame


def clip_vit_l14_224_config() -> CLIPVisionConfig:
    """OpenAI CLIP ViT-L/14 at 224 px: EventGPT's tower, and Video-LLaVA-7B's image/video towers."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def eventgpt_config(name: str, *, original_layout: bool | None = None, **overrides) -> EventGPTConfig:
    """A preset configuration; building it allocates no weights.

    - "7b": Vicuna-7B LM (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) + CLIP ViT-L/14
      at 224 px (hidden 1024, 24 layers, 16 heads). ~7.08 B parameters.
    - "1b": a TinyLlama-1.1B-shaped LM (hidden 2048, 22 layers, 32 heads over 4 kv heads, intermediate
      5632, vocab 32000) + the same CLIP ViT-L/14 (so the frozen tower is shared with "7b"). ~1.41 B.
    - "tiny": test shape: vocab 128 (testing_models.VOCAB_SIZE), hidden 64, 2 layers, 4 heads over 2 kv
      heads of head dim 16; CLIP 16 px images, patch 8, hidden 32, 2 layers.

    ``original_layout``: True, the original EventGPT token layout (last CLIP layer, CLS kept, no
    per-frame tokens: 262 event tokens at 224 px); False, the per-frame layout (1,541); None, the
    preset's default (original for "7b" / "1b", per-frame for "tiny"). ``overrides`` are
    EventGPTConfig arguments.
    """
    if name not in PRESETS:
        raise ValueError(f"eventgpt_config: unknown preset {name!r}; choose one of {PRESETS}")
    if original_layout is None:
        original_layout = name != "tiny"
    if name == "tiny":
        from crossspec_kernels.testing_models import IMAGE_SIZE, PATCH_SIZE, tiny_llama_config

        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=32,
        )
        text = tiny_llama_config(head_dim=16)
    else:
        vision = clip_vit_l14_224_config()
        common = dict(
            vocab_size=32000,
            max_position_embeddings=4096 if name == "7b" else 2048,
            rms_norm_eps=1e-5 if name == "1b" else 1e-6,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        if name == "7b":
            shape = dict(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
            )
        else:
            shape = dict(
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=22,
                num_attention_heads=32,
                num_key_value_heads=4,
            )
        text = LlamaConfig(**common, **shape)
    settings: dict[str, Any] = dict(vision_config=vision, text_config=text, num_frames=5)
    if original_layout:
        settings.update(
            vision_feature_layer=-1, vision_feature_select_strategy="full", include_frame_tokens=False
        )
    settings.update(overrides)
    return EventGPTConfig(**settings)


def eventgpt_parameter_counts(config: EventGPTConfig) -> dict[str, int]:
    """Parameters per component, computed from the config alone (no model is built).

    Keys: "vision_tower", "multi_modal_projector", "feature_adaptor", "language_model", "lm_head", "total".
    """
    vision, text = config.vision_config, config.text_config
    cv, iv, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    positions = (vision.image_size // patch) ** 2 + 1
    clip_layer = 4 * (cv * cv + cv) + (cv * iv + iv) + (iv * cv + cv) + 2 * 2 * cv
    vision_params = (
        cv * vision.num_channels * patch * patch  # patch embedding (no bias)
        + cv  # class embedding
        + positions * cv
        + 2 * cv  # pre_layrnorm
        + vision.num_hidden_layers * clip_layer
        + 2 * cv  # post_layernorm
    )
    hidden, inter, vocab = text.hidden_size, text.intermediate_size, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    q_width, kv_width = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    attn_bias = bool(getattr(text, "attention_bias", False))
    mlp_bias = bool(getattr(text, "mlp_bias", False))
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    if attn_bias:
        attention += q_width + 2 * kv_width + hidden
    mlp = 3 * hidden * inter + (2 * inter + hidden if mlp_bias else 0)
    language = vocab * hidden + text.num_hidden_layers * (attention + mlp + 2 * hidden) + hidden
    bias = 1 if config.projector_bias else 0
    projector = cv * hidden + hidden * bias + hidden * hidden + hidden * bias
    adaptor = (
        (hidden * hidden + (hidden if config.feature_adaptor_bias else 0))
        if config.use_feature_adaptor
        else 0
    )
    counts = dict(
        vision_tower=vision_params,
        multi_modal_projector=projector,
        feature_adaptor=adaptor,
        language_model=language,
        lm_head=vocab * hidden,
    )
    counts["total"] = sum(counts.values())
    return counts


# ----------------------------------------------------------------------------------------------
# Preprocessing and prompts
# ----------------------------------------------------------------------------------------------


def preprocess_event_frames(
    frames: torch.Tensor,
    image_size: int,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 event frames [N, 3, H, W] or [B, N, 3, H, W] -> CLIP pixel values [.., 3, S, S] float32.

    Like CLIPImageProcessor: resize the shortest side to ``image_size`` (bilinear, antialiased; the long
    side to ``int(image_size * long / short)``), center crop ``image_size`` x ``image_size``, scale to
    [0, 1], normalize with CLIP's mean and std. The frames are the white-background renderings of
    ``events_to_frames(..., representation="eventgpt")``. Computed in float32 on the frames' device, so
    values differ from CLIPImageProcessor's PIL path by resampling round-off only.
    """
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"preprocess_event_frames: frames must be a tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"preprocess_event_frames: frames must be uint8 (0..255), got {frames.dtype}")
    if frames.dim() not in (4, 5) or frames.shape[-3] != 3:
        raise ValueError(
            f"preprocess_event_frames: frames must be [N, 3, H, W] or [B, N, 3, H, W], got shape "
            f"{tuple(frames.shape)}"
        )
    if not _is_int(image_size) or image_size <= 0:
        raise ValueError(f"preprocess_event_frames: image_size must be a positive int, got {image_size!r}")
    lead, (height, width) = frames.shape[:-3], frames.shape[-2:]
    if min(height, width) == 0:
        raise ValueError(f"preprocess_event_frames: frames are empty, shape {tuple(frames.shape)}")
    flat = frames.reshape(-1, 3, height, width).float()
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if height <= width else (new_long, image_size)
    if size != (height, width):
        flat = F.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    flat = flat[:, :, top : top + image_size, left : left + image_size]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=flat.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=flat.device).view(1, 3, 1, 1)
    flat = (flat.clamp(0, 255) / 255.0 - mean_t) / std_t
    return flat.reshape(*lead, 3, image_size, image_size)


def format_prompt(question: str) -> str:
    """The Vicuna-v1 prompt EventGPT uses, with one ``<event>`` placeholder."""
    return f"{VICUNA_V1_SYSTEM} USER: {EVENT_PLACEHOLDER}\n{question} ASSISTANT:"


def _as_id_list(ids, what: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(
                f"EventGPTPromptBuilder: {what} must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}"
            )
        return [int(i) for i in ids.tolist()]
    if isinstance(ids, (list, tuple)) and all(_is_int(i) for i in ids):
        return list(ids)
    raise ValueError(f"EventGPTPromptBuilder: {what} must be a list of ints or a 1-D tensor, got {ids!r:.80}")


class EventGPTPromptBuilder:
    """Builds drafter ``input_ids`` from the Vicuna-v1 template with the event placeholders expanded.

    ``ids = before_ids + [event_token_index] * T_event + newline_ids + question_ids + end_ids``

    With ``tokenizer`` (e.g. ``LlamaTokenizer.from_pretrained(local_vicuna_dir)``), ``before_ids`` is the
    tokenization of ``"<system> USER: "`` (with BOS) and a text question is tokenized together with its
    surroundings as ``"\\n{question} ASSISTANT:"`` (no BOS), as LLaVA-style ``tokenizer_image_token``
    splits a prompt at the placeholder. Without a tokenizer the questions must be token ids and the
    template pieces default to ``before_ids=[bos]`` and empty ``newline_ids``/``end_ids``: pass the
    real pieces' ids for a real model.
    """

    def __init__(
        self,
        config: EventGPTConfig,
        tokenizer=None,
        *,
        before_ids: Sequence[int] | torch.Tensor | None = None,
        newline_ids: Sequence[int] | torch.Tensor | None = None,
        end_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        if not isinstance(config, EventGPTConfig):
            raise ValueError(
                f"EventGPTPromptBuilder: config must be an EventGPTConfig, got {type(config).__name__}"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.num_event_tokens = config.num_event_tokens
        self.event_token_index = config.event_token_index
        if before_ids is None:
            if tokenizer is not None:
                before_ids = self._tokenize(f"{VICUNA_V1_SYSTEM} USER: ", add_special_tokens=True)
            else:
                bos = config.text_config.bos_token_id
                before_ids = [] if bos is None else [bos]
        if newline_ids is None:
            newline_ids = self._tokenize("\n", add_special_tokens=False) if tokenizer is not None else []
        if end_ids is None:
            end_ids = self._tokenize(" ASSISTANT:", add_special_tokens=False) if tokenizer is not None else []
        self.before_ids = _as_id_list(before_ids, "before_ids")
        self.newline_ids = _as_id_list(newline_ids, "newline_ids")
        self.end_ids = _as_id_list(end_ids, "end_ids")

    def _tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        encoded = self.tokenizer(text, add_special_tokens=add_special_tokens)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]

    def __call__(self, question: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The prompt ids [T] (int64) for one question (text with a tokenizer, or token ids)."""
        events = [self.event_token_index] * self.num_event_tokens
        if isinstance(question, str):
            if self.tokenizer is None:
                raise ValueError(
                    "EventGPTPromptBuilder: a text question needs a tokenizer; pass token ids instead, or "
                    "build the builder with tokenizer=LlamaTokenizer.from_pretrained(<local vicuna dir>)"
                )
            tail = self._tokenize(f"\n{question} ASSISTANT:", add_special_tokens=False)
            return torch.tensor(self.before_ids + events + tail, dtype=torch.int64)
        question_ids = _as_id_list(question, "question ids")
        if self.event_token_index in question_ids:
            raise ValueError(
                f"EventGPTPromptBuilder: question ids contain the event placeholder id {self.event_token_index}"
            )
        ids = self.before_ids + events + self.newline_ids + question_ids + self.end_ids
        return torch.tensor(ids, dtype=torch.int64)

    def batch(
        self, questions: Sequence[str | Sequence[int] | torch.Tensor], pad_token_id: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (input_ids [B, T], attention_mask [B, T] int64) for several questions."""
        if len(questions) == 0:
            raise ValueError("EventGPTPromptBuilder.batch: questions is empty")
        if pad_token_id is None:
            pad_token_id = self.config.text_config.pad_token_id or 0
        rows = [self(question) for question in questions]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for index, row in enumerate(rows):
            input_ids[index, width - len(row) :] = row
            attention_mask[index, width - len(row) :] = 1
        return input_ids, attention_mask


def build_prompt_ids(
    question: str | Sequence[int] | torch.Tensor, config: EventGPTConfig, tokenizer=None, **template_ids
) -> torch.Tensor:
    """``EventGPTPromptBuilder(config, tokenizer, **template_ids)(question)``: prompt ids [T] int64."""
    return EventGPTPromptBuilder(config, tokenizer, **template_ids)(question)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def aggregate_event_features(features: torch.Tensor, *, include_frame_tokens: bool = True) -> torch.Tensor:
    """Spatio-temporal aggregation: [B, N, P, H] per-frame tokens -> [B, T_event, H].

    Output order: (every frame's P tokens, frame by frame, if ``include_frame_tokens``), then N per-frame
    means (over the frame's P tokens), then P temporal means (token p averaged over the N frames).
    """
    if features.dim() != 4:
        raise ValueError(
            f"aggregate_event_features: features must be [B, N, P, H], got shape {tuple(features.shape)}"
        )
    batch, frames, per_frame, hidden = features.shape
    parts = [features.mean(dim=2), features.mean(dim=1)]
    if include_frame_tokens:
        parts.insert(0, features.reshape(batch, frames * per_frame, hidden))
    return torch.cat(parts, dim=1)


class EventGPTProjector(nn.Module):
    """Linear(vision hidden, H) - activation - Linear(H, H) (the original's ``visual_projector``)."""

    def __init__(self, config: EventGPTConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, hidden, bias=config.projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=config.projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class EventGPTPreTrainedModel(PreTrainedModel):
    config: EventGPTConfig
    config_class = EventGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The prefill checks placeholder counts on the host; decode steps are graph-friendly.
    _can_compile_fullgraph = False
    _checkpoint_conversion_mapping: dict[str, str] = {}


class EventGPTModel(EventGPTPreTrainedModel):
    """Vision tower + projector + feature adaptor + LlamaModel, without the LM head."""

    def __init__(self, config: EventGPTConfig) -> None:
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = EventGPTProjector(config)
        hidden = config.text_config.hidden_size
        self.feature_adaptor = (
            nn.Linear(hidden, hidden, bias=config.feature_adaptor_bias)
            if config.use_feature_adaptor
            else None
        )
        self.language_model = LlamaModel(config.text_config)
        # set_attn_implementation({"text_config": ...}) finds sub models by config identity.
        self.config.vision_config = self.vision_tower.config
        self.config.text_config = self.language_model.config
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _check_event_pixels(self, event_pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        if not isinstance(event_pixel_values, torch.Tensor):
            raise ValueError(
                f"EventGPT: event_pixel_values must be a tensor, got {type(event_pixel_values).__name__}"
            )
        size = vision.image_size
        if event_pixel_values.dim() != 5:
            raise ValueError(
                f"EventGPT: event_pixel_values must be 5-D [B, N, 3, S, S] = [B, {self.config.num_frames}, "
                f"{vision.num_channels}, {size}, {size}], got shape {tuple(event_pixel_values.shape)}"
            )
        _, frames, channels, height, width = event_pixel_values.shape
        if frames != self.config.num_frames:
            raise ValueError(
                f"EventGPT: event_pixel_values has {frames} frames, config.num_frames is {self.config.num_frames}"
            )
        if (channels, height, width) != (vision.num_channels, size, size):
            raise ValueError(
                f"EventGPT: event_pixel_values frames must be [{vision.num_channels}, {size}, {size}] "
                f"(image size {size}), got {[channels, height, width]}"
            )
        if not event_pixel_values.is_floating_point():
            raise ValueError(
                f"EventGPT: event_pixel_values must be floating point (see preprocess_event_frames), got "
                f"{event_pixel_values.dtype}"
            )

    def encode_events(self, event_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, N, 3, S, S] pixel values -> aggregated event tokens [B, T_event, H]."""
        self._check_event_pixels(event_pixel_values)
        batch, frames = event_pixel_values.shape[:2]
        pixels = event_pixel_values.flatten(0, 1).to(dtype=self.vision_tower.dtype)
        layer = self.config.vision_feature_layer
        outputs = self.vision_tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
        features = outputs.hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        features = self.multi_modal_projector(features)
        if self.feature_adaptor is not None:
            features = self.feature_adaptor(features)
        features = features.reshape(batch, frames, features.shape[1], features.shape[2])
        return aggregate_event_features(features, include_frame_tokens=self.config.include_frame_tokens)

    def _splice_events(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        event_features: torch.Tensor,
    ) -> torch.Tensor:
        is_event = input_ids == self.config.event_token_index
        expected = self.config.num_event_tokens
        batch = input_ids.shape[0]
        if event_features.dim() != 3 or tuple(event_features.shape[:2]) != (batch, expected):
            raise ValueError(
                f"EventGPT: event features must be [B, T_event, H] = [{batch}, {expected}, "
                f"{inputs_embeds.shape[-1]}], got shape {tuple(event_features.shape)}"
            )
        counts = is_event.sum(dim=-1).tolist()  # prefill only: one host sync, as HF LLaVA does
        if any(count != expected for count in counts):
            raise ValueError(
                f"EventGPT: every row of input_ids must hold the event placeholder "
                f"{self.config.event_token_index} exactly T_event = {expected} times (config.num_event_tokens; "
                f"use EventGPTPromptBuilder), got counts {counts}"
            )
        features = event_features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(is_event[..., None], features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        event_pixel_values: torch.FloatTensor | None = None,
        event_features: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ):
        """Returns the LlamaModel output (last_hidden_state = final-norm hidden state [B, T, H])."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("EventGPT: pass exactly one of input_ids and inputs_embeds")
        if event_pixel_values is not None and event_features is not None:
            raise ValueError("EventGPT: pass at most one of event_pixel_values and event_features")
        has_events = event_pixel_values is not None or event_features is not None
        if inputs_embeds is not None and has_events:
            raise ValueError(
                "EventGPT: event_pixel_values/event_features need input_ids (the placeholders mark where "
                "the event tokens go), got inputs_embeds"
            )
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"EventGPT: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
            is_event = input_ids == self.config.event_token_index
            # The placeholder may lie outside the vocabulary: embed a valid id there, overwritten below.
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(is_event, 0))
            if has_events:
                if event_pixel_values is not None:
                    if event_pixel_values.shape[0] != input_ids.shape[0]:
                        raise ValueError(
                            f"EventGPT: event_pixel_values batch {event_pixel_values.shape[0]} != input_ids "
                            f"batch {input_ids.shape[0]}"
                        )
                    event_features = self.encode_events(event_pixel_values)
                inputs_embeds = self._splice_events(input_ids, inputs_embeds, event_features)
            # A prompt check (it reads the cache length and the ids on the host): never in traced steps.
            elif not torch.compiler.is_compiling() and _is_prefill(past_key_values) and bool(is_event.any()):
                raise ValueError(
                    f"EventGPT: input_ids hold the event placeholder {self.config.event_token_index} but no "
                    "event_pixel_values (or event_features) were given"
                )
        kwargs.pop("return_dict", None)  # always a ModelOutput (HF callers pass return_dict=True)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        if outputs.hidden_states is not None:
            # Make the contract explicit: the last entry is the final-norm state lm_head reads.
            outputs.hidden_states = tuple(outputs.hidden_states[:-1]) + (outputs.last_hidden_state,)
        return outputs


def _is_prefill(past_key_values) -> bool:
    if past_key_values is None:
        return True
    get_length = getattr(past_key_values, "get_seq_length", None)
    return get_length is None or get_length() == 0


class EventGPTForCausalLM(EventGPTPreTrainedModel, GenerationMixin):
    """EventGPT-style drafter: :class:`EventGPTModel` + ``lm_head``.

    Submodules: ``model.vision_tower`` (CLIPVisionModel), ``model.multi_modal_projector``,
    ``model.feature_adaptor``, ``model.language_model`` (LlamaModel), ``lm_head``.
    """

    def __init__(self, config: EventGPTConfig) -> None:
        super().__init__(config)
        self.model = EventGPTModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def encode_events(self, event_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, N, 3, S, S] -> [B, T_event, hidden]: what replaces the placeholders."""
        return self.model.encode_events(event_pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        event_pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        event_features: torch.FloatTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward with event tokens spliced in at the placeholders.

        input_ids [B, T] (T_event placeholders per row when events are given); event_pixel_values
        [B, N, 3, S, S] (or precomputed ``event_features`` [B, T_event, H] from :meth:`encode_events`);
        extra keyword arguments go to the Llama layers (e.g. ``crossspec_tree_mask``). Returns logits
        [B, T, V] (the last ``logits_to_keep`` positions when > 0), past_key_values and, with
        ``output_hidden_states``, hidden_states whose last entry is the final-norm state.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            event_pixel_values=event_pixel_values,
            event_features=event_features,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.event_token_index, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=getattr(outputs, "attentions", None),
        )
        return output if return_dict or return_dict is None else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        inputs_embeds=None,
        event_pixel_values=None,
        event_features=None,
        **kwargs,
    ):
        # Event inputs go to the prefill only (afterwards the placeholders are in the cache). 5.x tells
        # the first step with is_first_iteration, 4.57 with cache_position.
        if "is_first_iteration" in kwargs:
            first = bool(kwargs["is_first_iteration"]) or not kwargs.get("use_cache", True)
        elif kwargs.get("cache_position") is not None:
            first = int(kwargs["cache_position"][0]) == 0
        else:
            first = _is_prefill(past_key_values)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        model_inputs.pop("event_pixel_values", None)
        model_inputs.pop("event_features", None)
        if first:
            model_inputs["event_pixel_values"] = event_pixel_values
            model_inputs["event_features"] = event_features
        return model_inputs

    @classmethod
    def from_original_checkpoint(
        cls,
        checkpoint: str | os.PathLike | dict[str, torch.Tensor],
        config: EventGPTConfig,
        *,
        vision_tower_state_dict: dict[str, torch.Tensor] | str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
    ) -> EventGPTForCausalLM:
        """Load an original EventGPT checkpoint (directory or state dict) into this class.

        See :func:`crossspec_kernels.models.eventgpt_convert.convert_eventgpt_state_dict` for the key
        mapping. ``vision_tower_state_dict``: CLIP weights (dict, or a local CLIP checkpoint directory)
        for checkpoints saved without their tower. ``config`` must match the checkpoint (for the
        original layout use ``eventgpt_config("7b")``, the preset's default).
        """
        from crossspec_kernels.models.eventgpt_convert import load_original_checkpoint

        return load_original_checkpoint(
            cls, checkpoint, config, vision_tower_state_dict=vision_tower_state_dict, dtype=dtype
        )


def register_auto_classes() -> None:
    """Register with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent; done on import)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(EventGPTConfig.model_type, EventGPTConfig, exist_ok=True)
    AutoModel.register(EventGPTConfig, EventGPTModel, exist_ok=True)
    AutoModelForCausalLM.register(EventGPTConfig, EventGPTForCausalLM, exist_ok=True)


register_auto_classes()
