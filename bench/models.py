"""The models of the end-to-end benchmarks (bench_e2e, bench_overlap), built in one place.

Presets:

* ``tiny`` (default without CUDA): the tiny random Video-LLaVA of crossspec_kernels.testing_models
  (fp32), a tiny EventGPT drafter and a tiny text-only Llama drafter whose language models copy the
  target's (as EventGPT and Video-LLaVA share Vicuna-7B), and a prompt of 40 + 60 text tokens around
  the 40 video tokens (the shared text steers the tiny LM), so drafts are sometimes accepted; a
  synthetic clip (synthetic_clip -> events_to_frames -> preprocess_event_frames; its video frames
  resized to the tiny image size). Acceptance numbers are those of tiny random models.
* ``7b`` (default with CUDA): a Video-LLaVA-7B-shaped target (Vicuna-7B LM, vocab 32064, CLIP ViT-L/14
  224 towers, 8 frames = 2,056 video tokens) built from its config with random bf16 weights on the GPU,
  drafters EventGPT-1B (behind a random linear adapter 2048 -> 4096) and EventGPT-7B
  (``eventgpt_config``), and the text-only Llama drafter of the target's LM shape. The 7B-shaped
  drafters copy the target's LM weights (rows shared by both vocabularies). With random weights
  acceptance means nothing: the timings and the step costs are what this preset measures.

HF assisted generation's assistant is a text-only Llama (``TextOnlyLlamaForCausalLM`` drops the pixel
inputs HF forwards to it); ``build_assistant`` makes one whose greedy proposal follows controlled
acceptance, as ``ControlledAcceptance`` does for the engine's drafter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable

import torch

from crossspec_kernels import testing_models as tm
from crossspec_kernels.events import synthetic_clip
from crossspec_kernels.models.adapters import AdapterConfig, LinearAdapter
from crossspec_kernels.models.eventgpt import (
    EventGPTForCausalLM,
    EventGPTPromptBuilder,
    eventgpt_config,
    preprocess_event_frames,
)
from crossspec_kernels.ops.events_to_frames import events_to_frames

PRESETS = ("tiny", "7b")
SEED = 0
VICUNA_VOCAB = 32064  # Video-LLaVA-7B's language model (Vicuna-7B + added tokens)
VIDEO_TOKEN_7B = 32001  # VideoLlavaConfig's default video_token_index
IMAGE_TOKEN_7B = 32000
NUM_VIDEO_FRAMES = 8
TINY_TEXT = (40, 60)  # tiny preset: text tokens before and after the 40 video placeholders
GPU_HEADROOM_GIB = 8.0  # activations, KV caches and the allocator's slack beside the weights
DRAFTERS_7B = ("eventgpt-1b", "eventgpt-7b", "llama-7b")

ACCEPTANCE_NOTES = {
    "tiny": "tiny random models (drafters copy the target's LM weights): acceptance is that of tiny random "
    "models, not of EventGPT/Video-LLaVA",
    "7b": "random bf16 weights at real shapes: acceptance (and so speedup) is meaningless; the timings and "
    "per-stage step costs are what this preset measures",
}


def text_only_llama_class():
    from transformers import LlamaForCausalLM

    class TextOnlyLlamaForCausalLM(LlamaForCausalLM):
        """A Llama that accepts, and drops, the pixel inputs HF assisted generation forwards to it."""

        def forward(
            self, *args, pixel_values_videos=None, pixel_values_images=None, pixel_values=None, **kwargs
        ):
            return super().forward(*args, **kwargs)

    return TextOnlyLlamaForCausalLM


@dataclasses.dataclass
class DrafterSpec:
    """How to build one drafter, lazily (the 7B preset holds one drafter on the GPU at a time)."""

    name: str
    build: Callable[[], tuple[torch.nn.Module, torch.nn.Module | None, dict]]  # (drafter, adapter, inputs)
    hf_assisted: bool
    hf_reason: str
    description: str
    parameters: int | None = None


@dataclasses.dataclass
class Setup:
    preset: str
    dtype: torch.dtype
    target: torch.nn.Module
    target_inputs: dict
    drafters: list[DrafterSpec]
    details: dict


def copy_target_lm(target, lm_model: torch.nn.Module, lm_head: torch.nn.Linear) -> None:
    """Copy the target's language model and LM head into a drafter's (vocabulary rows both have)."""
    source = target.model.language_model.state_dict()
    pairs = [(tensor, source[name]) for name, tensor in lm_model.state_dict().items()]
    pairs.append((lm_head.weight, target.get_output_embeddings().weight))
    with torch.no_grad():
        for tensor, value in pairs:
            if tensor.dim() == 2 and tensor.shape[1] == value.shape[1] and tensor.shape[0] != value.shape[0]:
                rows = min(tensor.shape[0], value.shape[0])  # embeddings / LM head over two vocabularies
                tensor[:rows].copy_(value[:rows])
            else:
                tensor.copy_(value)


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype):
    """Modules built inside allocate on ``device`` in ``dtype`` (random init where they live)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cls_or_fn, config, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """``cls_or_fn(config)`` with random weights in ``dtype`` on ``device``, as from_pretrained(dtype=)
    leaves it: parameters in ``dtype``, float32 buffers (RoPE inv_freq) untouched."""
    torch.manual_seed(seed)
    with building(device, dtype):
        model = cls_or_fn(config)
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return model.eval()


def parameter_count(cls_or_fn, config) -> int:
    """Parameters of ``cls_or_fn(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = cls_or_fn(config)
    return sum(p.numel() for p in model.parameters())


def _event_pixels(events, config, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """events -> EventGPT frames (on ``device``) -> CLIP pixel values [1, N, 3, S, S]."""
    coords = [getattr(events, name).to(device) for name in ("x", "y", "t", "p")]
    frames = events_to_frames(
        *coords, sensor_size=events.sensor_size, representation="eventgpt", num_frames=config.num_frames
    )
    return preprocess_event_frames(frames, config.vision_config.image_size)[None].to(dtype)


def _eventgpt_spec(name, config, target, before_ids, question_ids, events, device, dtype, seed, *, copy_lm):
    d_target = target.config.text_config.hidden_size

    def build():
        drafter = build_model(EventGPTForCausalLM, config, device, dtype, seed)
        if copy_lm:
            copy_target_lm(target, drafter.model.language_model, drafter.lm_head)
        adapter = None
        if config.text_config.hidden_size != d_target:
            torch.manual_seed(seed + 1)
            adapter_config = AdapterConfig(
                kind="linear", d_draft=config.text_config.hidden_size, d_target=d_target
            )
            with building(device, dtype):
                adapter = LinearAdapter(adapter_config)
            adapter = adapter.eval()
        builder = EventGPTPromptBuilder(config, before_ids=before_ids)
        ids, mask = builder.batch([question_ids])
        inputs = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            event_pixel_values=_event_pixels(events, config, device, dtype),
        )
        return drafter, adapter, inputs

    layout = f"{config.num_event_tokens} event tokens from {config.num_frames} event frames"
    return DrafterSpec(
        name=name,
        build=build,
        hf_assisted=False,
        hf_reason=(
            "HF assisted generation feeds the assistant the target's input_ids (text + video placeholders) and "
            "its pixel_values_videos; the EventGPT drafter reads its own prompt and event frames, which HF's "
            "assistant API cannot pass, so this baseline does not exist for it (not faked)"
        ),
        description=f"EventGPT-{name.split('-')[-1]} ({layout}; LM {'copied from the target' if copy_lm else 'random'}"
        + (
            ", linear adapter to the target's hidden size"
            if config.text_config.hidden_size != d_target
            else ""
        )
        + ")",
        parameters=parameter_count(EventGPTForCausalLM, config),
    )


def _llama_spec(name, target, target_inputs, device, dtype, seed):
    cls = text_only_llama_class()
    config = target.config.text_config

    def build():
        drafter = build_model(cls, config, device, dtype, seed)
        copy_target_lm(target, drafter.model, drafter.lm_head)
        drafter.set_attn_implementation("sdpa")
        inputs = dict(input_ids=target_inputs["input_ids"], attention_mask=target_inputs["attention_mask"])
        return drafter, None, inputs

    return DrafterSpec(
        name=name,
        build=build,
        hf_assisted=True,
        hf_reason="",
        description="text-only Llama of the target's LM shape, LM weights copied from the target, reading the "
        "target's prompt (video placeholders as plain tokens)",
        parameters=parameter_count(cls, config),
    )


def _clip(events_per_second: float, height: int, width: int):
    return synthetic_clip(
        num_frames=NUM_VIDEO_FRAMES,
        height=height,
        width=width,
        events_per_second=events_per_second,
        seed=SEED,
    )


def tiny_request(device: torch.device, dtype: torch.dtype):
    """The tiny presets' request: (target_inputs, text before the video, question, events) of
    the synthetic clip (48x64, 20k events/s) and ``TINY_TEXT``'s prompt."""
    events, video = _clip(20_000.0, 48, 64)
    text_before, text_after = TINY_TEXT
    prompt = tm.video_prompt(text_before, text_after, seed=SEED)
    ids = prompt[None].to(device)
    target_inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=preprocess_event_frames(video, tm.IMAGE_SIZE)[None].to(device, dtype),
    )
    return target_inputs, prompt[:text_before].tolist(), prompt[-text_after:].tolist(), events


def tiny_setup(device: torch.device) -> Setup:
    dtype = torch.float32
    target = tm.tiny_video_llava(seed=SEED, attn_implementation="sdpa").to(device)
    target_inputs, before, question, events = tiny_request(device, dtype)
    ids = target_inputs["input_ids"]
    config = eventgpt_config("tiny")
    drafters = [
        _eventgpt_spec(
            "eventgpt-tiny", config, target, before, question, events, device, dtype, SEED + 7, copy_lm=True
        ),
        _llama_spec("llama-tiny", target, target_inputs, device, dtype, SEED + 9),
    ]
    details = dict(
        target=f"tiny random VideoLlavaForConditionalGeneration (testing_models, fp32, {tm.VIDEO_TOKENS} video tokens)",
        clip="synthetic_clip(8 frames, 48x64, 20k events/s, seed 0)",
        prompt_tokens=int(ids.shape[1]),
    )
    return Setup("tiny", dtype, target, target_inputs, drafters, details)


def video_llava_7b_config():
    """Video-LLaVA-7B's shape: Vicuna-7B LM (vocab 32064) + CLIP ViT-L/14 224 towers, 8 frames."""
    from transformers import LlamaConfig, VideoLlavaConfig

    from crossspec_kernels.models.eventgpt import clip_vit_l14_224_config

    vision = clip_vit_l14_224_config()
    text = LlamaConfig(
        vocab_size=VICUNA_VOCAB,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    tokens_per_frame = (224 // 14) ** 2 + 1  # the video tower keeps CLS: 257
    return VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_7B,
        video_token_index=VIDEO_TOKEN_7B,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        video_seq_length=NUM_VIDEO_FRAMES * tokens_per_frame,
        image_seq_length=tokens_per_frame - 1,
    )


def _check_gpu_memory(device: torch.device, needed_bytes: int, what: str) -> None:
    free, total = torch.cuda.mem_get_info(device)
    if free < needed_bytes:
        raise SystemExit(
            f"--preset 7b: not enough GPU memory on {torch.cuda.get_device_name(device)}: {what} need "
            f"about {needed_bytes / 2**30:.1f} GiB (weights + {GPU_HEADROOM_GIB:.0f} GiB headroom), "
            f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB are free. Use a GPU with more memory, or "
            "--drafters to load fewer/smaller drafters, or --preset tiny."
        )


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise SystemExit(
            "--preset 7b needs a CUDA device (none found, or --cpu given); "
            "use --preset tiny for the CPU smoke test"
        )


def seven_b_setup(device: torch.device, drafter_names: list[str]) -> Setup:
    from transformers import VideoLlavaForConditionalGeneration

    require_cuda(device)
    dtype = torch.bfloat16
    config = video_llava_7b_config()
    drafter_configs = {"eventgpt-1b": eventgpt_config("1b"), "eventgpt-7b": eventgpt_config("7b")}
    target_params = parameter_count(VideoLlavaForConditionalGeneration, config)
    counts = {"target": target_params}
    text_cls = text_only_llama_class()
    for name in drafter_names:
        if name == "llama-7b":
            counts[name] = parameter_count(text_cls, config.text_config)
        else:
            counts[name] = parameter_count(EventGPTForCausalLM, drafter_configs[name])
    largest = max((counts[name] for name in drafter_names), default=0)
    needed = (target_params + largest) * dtype.itemsize + int(GPU_HEADROOM_GIB * 2**30)
    _check_gpu_memory(
        device,
        needed,
        f"the target ({target_params / 1e9:.2f} B) and the largest drafter "
        f"({largest / 1e9:.2f} B parameters, bf16, one drafter loaded at a time)",
    )

    events, video = _clip(200_000.0, 260, 346)  # DAVIS346 sensor
    target = build_model(VideoLlavaForConditionalGeneration, config, device, dtype, SEED)
    target.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    generator = torch.Generator().manual_seed(SEED)
    before = [1] + torch.randint(3, 32000, (15,), generator=generator).tolist()
    question = torch.randint(3, 32000, (24,), generator=generator).tolist()
    prompt = torch.tensor(before + [VIDEO_TOKEN_7B] * config.video_seq_length + question)
    ids = prompt[None].to(device)
    target_inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=preprocess_event_frames(video.to(device), config.vision_config.image_size)[
            None
        ].to(dtype),
    )
    drafters = []
    for name in drafter_names:
        if name == "llama-7b":
            drafters.append(_llama_spec(name, target, target_inputs, device, dtype, SEED + 9))
        else:
            drafters.append(
                _eventgpt_spec(
                    name,
                    drafter_configs[name],
                    target,
                    before,
                    question,
                    events,
                    device,
                    dtype,
                    SEED + 7,
                    copy_lm=name == "eventgpt-7b",
                )
            )
    details = dict(
        target="VideoLlavaForConditionalGeneration, Video-LLaVA-7B shape (Vicuna-7B LM vocab 32064, CLIP ViT-L/14 "
        f"224 video and image towers, {config.video_seq_length} video tokens), random bf16 weights, sdpa",
        clip="synthetic_clip(8 frames, 260x346, 200k events/s, seed 0)",
        prompt_tokens=int(ids.shape[1]),
        parameters=counts,
    )
    return Setup("7b", dtype, target, target_inputs, drafters, details)


def use_native_attention(target, drafter=None) -> None:
    """HF baselines run on sdpa (the engine switches the language models to "crossspec")."""
    target.set_attn_implementation({"text_config": "sdpa"})
    if drafter is not None and not isinstance(drafter, EventGPTForCausalLM):
        drafter.set_attn_implementation("sdpa")


def controlled_assistant_class():
    base = text_only_llama_class()

    class ControlledAssistant(base):
        """HF assistant whose greedy proposal is replaced as ControlledAcceptance replaces ours: the
        reference token with probability alpha, else another id. The forward still runs in full."""

        control: dict | None = None

        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            cache_position=None,
            pixel_values_videos=None,
            pixel_values_images=None,
            pixel_values=None,
            **kwargs,
        ):
            out = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, cache_position=cache_position, **kwargs
            )
            control = self.control
            if control is None or out.logits is None:
                return out
            batch, device = out.logits.shape[0], out.logits.device
            if cache_position is not None:  # a device tensor: no host sync added to HF's loop
                length = cache_position[-1:] + 1
            else:
                length = torch.tensor(
                    [(attention_mask if attention_mask is not None else input_ids).shape[1]]
                )
            position = (length.to(device) - control["prompt_len"]).expand(batch)
            wanted = control["acceptance"].apply(out.logits[:, -1].argmax(-1), position)
            last = torch.full_like(out.logits[:, -1], -1e4)
            last.scatter_(1, wanted[:, None], 1e4)
            out.logits = torch.cat([out.logits[:, :-1], last[:, None]], 1)
            return out

    return ControlledAssistant


def build_assistant(setup: Setup, device) -> tuple[torch.nn.Module, str]:
    cls = controlled_assistant_class()
    if setup.preset == "tiny":
        config = copy.deepcopy(setup.target.config.text_config)
        what = "text-only Llama of the tiny target's LM shape"
    else:
        config = copy.deepcopy(eventgpt_config("1b").text_config)
        config.vocab_size = VICUNA_VOCAB  # the target's vocabulary, so HF shares ids one to one
        what = "text-only Llama of EventGPT-1B's LM shape (TinyLlama-1.1B, vocab 32064), random bf16 weights"
    assistant = build_model(cls, config, device, setup.dtype, SEED + 11)
    assistant.set_attn_implementation("sdpa")
    return assistant, what + ", greedy proposals replaced by controlled acceptance (same rule as ours)"


def setup_for(preset: str, device: torch.device, drafter_names: list[str]) -> Setup:
    return tiny_setup(device) if preset == "tiny" else seven_b_setup(device, drafter_names)
