"""End-to-end benchmark of ``CrossSpecEngine`` against autoregressive and HF assisted generation.

Two ways to run it, from the repository root:

    python bench/bench_e2e.py [--preset tiny|7b] [--out results.json] [--quick]   # table + JSON
    pytest bench/bench_e2e.py                                                   # the CPU smoke test

Every variant runs in the same process, on the same inputs, greedy (temperature 0), batch 1, with
end-of-sequence stopping off, so every variant generates exactly ``--max-new-tokens`` tokens:

* ``ar``: ``target.generate(do_sample=False)``, the autoregressive baseline and the reference tokens.
* ``hf_assisted-<drafter>-g<k>``: ``target.generate(assistant_model=drafter)``, HF assisted
  generation with a fixed chain of k drafts per round (constant schedule, confidence threshold 0), and
  ``hf_assisted-<drafter>-default`` with HF's default assistant settings (20 drafts, confidence
  threshold 0.4). HF's assistant reads the target's own ``input_ids``, so this baseline exists only
  for a drafter that is a plain causal LM sharing the target's vocabulary: the text-only Llama drafter
  (the target's LM shape, reading the prompt with the video placeholders as plain tokens). It is
  recorded as skipped, with the reason, for the EventGPT drafters. HF forwards the target's
  ``pixel_values_videos`` to the assistant, which a text-only Llama rejects, so the Llama drafter is a
  ``LlamaForCausalLM`` subclass whose forward drops the pixel inputs (it would ignore them anyway).
* ``ours-<drafter>-chain<k>`` / ``ours-<drafter>-tree<top_k>x<depth>n<nodes>``: ``CrossSpecEngine`` with
  ``ChainDraft(k)`` for k in ``--gammas`` and ``TreeDraft`` (``--tree``), for every drafter (the
  EventGPT drafters read the event frames; the Llama drafter reads the target's prompt, as HF's does).

Timing: median, p20 and p80 over ``--repeats`` runs after one warm-up run, wall clock around the whole
call with the device synchronised before and after. TTFT: the engine's ``stats["ttft_ms"]``; for the HF
paths the time at which ``generate`` hands the first new token to a streamer (HF copies it to the host
there). HF assisted rounds are counted from the streamer's puts (one per round), which gives its
tokens per round and acceptance. Preprocessing (video resize, events -> frames -> CLIP pixels) is done
once beforehand and is not timed.

Analytic model (per ours variant; medians over repeats; N = new tokens; stage_ms from the engine):

    T_step   = (T_ar_total - TTFT_ar) / (N - 1)           target decode step, from the ar baseline
    E        = tokens committed per round = N / rounds   (stats tokens_per_round; measured acceptance)
    c_verify = (verify.forward + verify.accept + kv.compact) / rounds
    c_draft  = draft.step / rounds   (every drafter step: prefill-time drafting and catch-up included)
    predicted decode speedup = E * T_step / (c_verify + c_draft)            (steady state, no prefill)
    TTFT_pred    = max(TTFT_ar, draft.prefill) + c_verify   (prefill hiding: the drafter's prefill
                   runs under the target's, and the first round verifies the free drafts)
    T_total_pred = TTFT_pred + (N / E - 1) * (c_verify + c_draft)
    predicted speedup = T_ar_total / T_total_pred;   measured speedup = T_ar_total / T_total
    system efficiency = measured speedup / predicted speedup  (= T_total_pred / T_total)
    TTFT efficiency   = TTFT_pred / TTFT

Stage times are summed spans (CUDA events on their streams, perf_counter on CPU), so the model is a
serial sum: efficiency below 1 is the time outside the stages (Python, launches, syncs), above 1 is
overlap between the drafter's and the target's streams.

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

Without a CUDA device this runs the tiny preset on CPU as a smoke test that claims nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable

import torch
from _common import (
    QUANTILES,
    SMOKE_BANNER,
    _quantile,
    finish_run,
    format_table,
    results_payload,
    run_configs,
    script_arg_parser,
    start_run,
    synchronize,
)

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
from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine, TreeDraft
from crossspec_kernels.runtime.stages import STAGES

OP = "e2e"
PRESETS = ("tiny", "7b")
SEED = 0
VICUNA_VOCAB = 32064  # Video-LLaVA-7B's language model (Vicuna-7B + added tokens)
VIDEO_TOKEN_7B = 32001  # VideoLlavaConfig's default video_token_index
IMAGE_TOKEN_7B = 32000
NUM_VIDEO_FRAMES = 8
TINY_TEXT = (40, 60)  # tiny preset: text tokens before and after the 40 video placeholders
GPU_HEADROOM_GIB = 8.0  # activations, KV caches and the allocator's slack beside the weights

ACCEPTANCE_NOTES = {
    "tiny": "tiny random models (drafters copy the target's LM weights): acceptance is that of tiny random "
    "models, not of EventGPT/Video-LLaVA",
    "7b": "random bf16 weights at real shapes: acceptance (and so speedup) is meaningless; the timings and "
    "per-stage step costs are what this preset measures",
}

ANALYTIC_MODEL = {
    "T_step": "(T_ar_total - TTFT_ar) / (N - 1): target decode step, from the autoregressive baseline",
    "E": "tokens committed per round = N / rounds (engine stats tokens_per_round)",
    "c_verify": "(stage_ms verify.forward + verify.accept + kv.compact) / rounds",
    "c_draft": "stage_ms draft.step / rounds (all drafter steps, prefill-time drafting included)",
    "predicted_decode_speedup": "E * T_step / (c_verify + c_draft)  (steady state, prefill excluded)",
    "ttft_pred": "max(TTFT_ar, stage_ms draft.prefill) + c_verify  (prefill hiding)",
    "total_pred": "ttft_pred + (N / E - 1) * (c_verify + c_draft)",
    "predicted_speedup": "T_ar_total / total_pred",
    "measured_speedup": "T_ar_total / T_total (medians)",
    "system_efficiency": "measured_speedup / predicted_speedup",
    "ttft_efficiency": "ttft_pred / TTFT (medians)",
    "caveat": "stage times are summed spans, so this is a serial-sum model: < 1 is time outside the stages "
    "(Python, launches, syncs), > 1 is overlap of the drafter's and target's streams",
}


# ----------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------


def _text_only_llama_class():
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


def _copy_lm(target, lm_model: torch.nn.Module, lm_head: torch.nn.Linear) -> None:
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
def _building(device: torch.device, dtype: torch.dtype):
    """Modules built inside allocate on ``device`` in ``dtype`` (random init where they live)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _build(cls_or_fn, config, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """``cls_or_fn(config)`` with random weights in ``dtype`` on ``device``, as from_pretrained(dtype=)
    leaves it: parameters in ``dtype``, float32 buffers (RoPE inv_freq) untouched."""
    torch.manual_seed(seed)
    with _building(device, dtype):
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
        drafter = _build(EventGPTForCausalLM, config, device, dtype, seed)
        if copy_lm:
            _copy_lm(target, drafter.model.language_model, drafter.lm_head)
        adapter = None
        if config.text_config.hidden_size != d_target:
            torch.manual_seed(seed + 1)
            adapter_config = AdapterConfig(
                kind="linear", d_draft=config.text_config.hidden_size, d_target=d_target
            )
            with _building(device, dtype):
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
    cls = _text_only_llama_class()
    config = target.config.text_config

    def build():
        drafter = _build(cls, config, device, dtype, seed)
        _copy_lm(target, drafter.model, drafter.lm_head)
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


def _clip(preset: str, events_per_second: float, height: int, width: int):
    return synthetic_clip(
        num_frames=NUM_VIDEO_FRAMES,
        height=height,
        width=width,
        events_per_second=events_per_second,
        seed=SEED,
    )


def tiny_setup(device: torch.device) -> Setup:
    dtype = torch.float32
    events, video = _clip("tiny", 20_000.0, 48, 64)
    target = tm.tiny_video_llava(seed=SEED, attn_implementation="sdpa").to(device)
    text_before, text_after = TINY_TEXT
    prompt = tm.video_prompt(text_before, text_after, seed=SEED)
    ids = prompt[None].to(device)
    target_inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=preprocess_event_frames(video, tm.IMAGE_SIZE)[None].to(device, dtype),
    )
    before, question = prompt[:text_before].tolist(), prompt[-text_after:].tolist()
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
            f"bench_e2e --preset 7b: not enough GPU memory on {torch.cuda.get_device_name(device)}: {what} need "
            f"about {needed_bytes / 2**30:.1f} GiB (weights + {GPU_HEADROOM_GIB:.0f} GiB headroom), "
            f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB are free. Use a GPU with more memory, or "
            "--drafters to load fewer/smaller drafters, or --preset tiny."
        )


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise SystemExit(
            "bench_e2e --preset 7b needs a CUDA device (none found, or --cpu given); "
            "use --preset tiny for the CPU smoke test"
        )


def seven_b_setup(device: torch.device, drafter_names: list[str]) -> Setup:
    from transformers import VideoLlavaForConditionalGeneration

    _require_cuda(device)
    dtype = torch.bfloat16
    config = video_llava_7b_config()
    drafter_configs = {"eventgpt-1b": eventgpt_config("1b"), "eventgpt-7b": eventgpt_config("7b")}
    target_params = parameter_count(VideoLlavaForConditionalGeneration, config)
    counts = {"target": target_params}
    text_cls = _text_only_llama_class()
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

    events, video = _clip("7b", 200_000.0, 260, 346)  # DAVIS346 sensor
    target = _build(VideoLlavaForConditionalGeneration, config, device, dtype, SEED)
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


# ----------------------------------------------------------------------------------------------
# Variants and runs
# ----------------------------------------------------------------------------------------------


class _TokenClock:
    """A generate() streamer: the time the first new tokens reach the host, and the number of puts."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def ttft_ms(self) -> float | None:
        # The first put is the prompt; the second carries the first new token(s).
        return (self.puts[1] - self.start) * 1e3 if len(self.puts) > 1 else None

    @property
    def rounds(self) -> int:
        return max(len(self.puts) - 1, 0)


@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str  # "ar" | "hf_assisted" | "ours"
    drafter: str | None = None
    gamma: int | None = None  # chain length (ours ChainDraft, HF num_assistant_tokens); None = HF default
    tree: TreeDraft | None = None

    @property
    def draft(self) -> ChainDraft | TreeDraft | None:
        if self.kind != "ours":
            return None
        return self.tree if self.tree is not None else ChainDraft(self.gamma)

    def __str__(self) -> str:
        if self.kind == "ar":
            return "ar"
        if self.tree is not None:
            shape = f"tree{self.tree.top_k}x{self.tree.depth}n{self.tree.max_nodes}"
        elif self.kind == "hf_assisted":
            shape = "default" if self.gamma is None else f"g{self.gamma}"
        else:
            shape = f"chain{self.gamma}"
        return f"{self.kind}-{self.drafter}-{shape}"


def _quantiles(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(zip(("median", "p20", "p80"), (_quantile(values, q) for q in QUANTILES)))


def _median(values: list[float]):
    found = _quantiles(values)
    return None if found is None else found["median"]


@contextlib.contextmanager
def _assistant_settings(drafter, gamma: int | None):
    """HF assisted: a fixed chain of gamma drafts, or HF's defaults (reset on every call, since the
    heuristic schedule and the confidence threshold persist on the assistant between calls)."""
    config = drafter.generation_config
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    saved = {name: getattr(config, name, None) for name in names}
    if gamma is None:
        settings = dict(
            num_assistant_tokens=20,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.4,
        )
    else:
        settings = dict(
            num_assistant_tokens=gamma,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.0,
        )
    for name, value in settings.items():
        setattr(config, name, value)
    try:
        yield settings
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def _use_native_attention(target, drafter=None) -> None:
    """HF baselines run on sdpa (the engine switches the language models to "crossspec")."""
    target.set_attn_implementation({"text_config": "sdpa"})
    if drafter is not None and not isinstance(drafter, EventGPTForCausalLM):
        drafter.set_attn_implementation("sdpa")


def run_once(variant: Variant, setup: Setup, drafter, adapter, drafter_inputs, args, device) -> dict:
    """One timed call: {"tokens", "total_ms", "ttft_ms", "stats"}."""
    target, inputs, new_tokens = setup.target, setup.target_inputs, args.max_new_tokens
    prompt_len = inputs["input_ids"].shape[1]
    if variant.kind == "ours":
        engine = CrossSpecEngine(
            target,
            drafter,
            adapter,
            draft=variant.draft,
            free_token_budget=args.free_token_budget,
            backend=args.backend,
        )
        synchronize(device)
        start = time.perf_counter()
        out = engine.generate(
            inputs, drafter_inputs, max_new_tokens=new_tokens, temperature=0.0, seed=SEED, eos_token_id=[]
        )
        synchronize(device)
        total_ms = (time.perf_counter() - start) * 1e3
        return dict(
            tokens=out.sequences.cpu(), total_ms=total_ms, ttft_ms=out.stats["ttft_ms"], stats=out.stats
        )
    _use_native_attention(target, drafter)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)  # None: no EOS stop
    settings = contextlib.nullcontext()
    if variant.kind == "hf_assisted":
        kwargs["assistant_model"] = drafter
        settings = _assistant_settings(drafter, variant.gamma)
    with settings:
        synchronize(device)
        clock = _TokenClock()
        with torch.no_grad():
            out = target.generate(**inputs, streamer=clock, **kwargs)
        synchronize(device)
        total_ms = (time.perf_counter() - clock.start) * 1e3
    return dict(
        tokens=out[:, prompt_len:].cpu(), total_ms=total_ms, ttft_ms=clock.ttft_ms, rounds=clock.rounds
    )


def measure(
    variant, setup, drafter, adapter, drafter_inputs, args, device, reference
) -> tuple[dict, list[str]]:
    row = dict(config=str(variant), kind=variant.kind, drafter=variant.drafter, backend=variant.kind)
    row["draft"] = (
        None
        if variant.kind == "ar"
        else (
            str(variant.draft)
            if variant.kind == "ours"
            else (
                "HF defaults (20 drafts, constant, confidence 0.4)"
                if variant.gamma is None
                else f"{variant.gamma} drafts, constant schedule, confidence threshold 0"
            )
        )
    )
    problems = []
    for _ in range(args.warmup):
        run_once(variant, setup, drafter, adapter, drafter_inputs, args, device)
    runs = [
        run_once(variant, setup, drafter, adapter, drafter_inputs, args, device) for _ in range(args.repeats)
    ]
    tokens = runs[0]["tokens"]
    row["new_tokens"] = int(tokens.shape[1])
    if tokens.shape[1] != args.max_new_tokens:
        problems.append(f"{variant}: generated {tokens.shape[1]} tokens, expected {args.max_new_tokens}")
    if any(not torch.equal(run["tokens"], tokens) for run in runs):
        problems.append(f"{variant}: greedy tokens differ between repeats")
    if reference is None:
        row["tokens_identical"] = True  # the reference itself
        row["_tokens"] = tokens
    else:
        same = tokens.shape == reference.shape and bool(torch.equal(tokens, reference))
        row["tokens_identical"] = same
        if not same:
            common = min(tokens.shape[1], reference.shape[1])
            diff = (tokens[0, :common] != reference[0, :common]).nonzero()
            row["first_mismatch"] = int(diff[0]) if len(diff) else common
            message = (
                f"{variant}: greedy tokens differ from target.generate (first at {row['first_mismatch']})"
            )
            if setup.dtype == torch.float32:
                problems.append(message)
            else:  # bf16: a near-tie between the one-token and the many-token forward can flip a token
                row["mismatch_note"] = (
                    f"{message}; {setup.dtype} near-ties, the losslessness contract is fp32"
                )
    totals = [run["total_ms"] for run in runs]
    row["total_ms"] = _quantiles(totals)
    row.update(
        median_us=row["total_ms"]["median"] * 1e3,
        p20_us=row["total_ms"]["p20"] * 1e3,
        p80_us=row["total_ms"]["p80"] * 1e3,
    )
    row["ttft_ms"] = _quantiles([run["ttft_ms"] for run in runs])
    row["tokens_per_s"] = _quantiles([row["new_tokens"] / (t / 1e3) for t in totals])
    row["timing_method"] = (
        f"wall clock around the call, device synchronised, {args.repeats} repeats after {args.warmup} warm-up"
    )
    if variant.kind == "ours":
        stats = [run["stats"] for run in runs]
        for key in (
            "acceptance_rate",
            "mean_accepted_length",
            "tokens_per_round",
            "free_tokens",
            "free_tokens_accepted",
            "rounds",
        ):
            row[key] = _median([s[key] for s in stats])
        row["engine_tokens_per_s"] = _quantiles([s["tokens_per_s"] for s in stats])
        row["stage_ms"] = {stage: _median([s["stage_ms"].get(stage, 0.0) for s in stats]) for stage in STAGES}
        row["fallback"] = any(s["fallback"] for s in stats)
        if row["fallback"]:
            reasons = {s["fallback_reason"] for s in stats if s["fallback"]}
            problems.append(f"{variant}: the engine fell back to target-only decoding: {reasons}")
    elif variant.kind == "hf_assisted":
        rounds = _median([run["rounds"] for run in runs])
        per_round = row["new_tokens"] / rounds if rounds else None
        row["rounds"] = rounds
        row["tokens_per_round"] = per_round
        row["mean_accepted_length"] = None if per_round is None else per_round - 1
        row["acceptance_rate"] = (
            None if per_round is None or variant.gamma is None else (per_round - 1) / variant.gamma
        )
        row["round_count_method"] = "generate() streamer puts (one per assisted round)"
    return row, problems


def analytic(row: dict, ar: dict, new_tokens: int) -> dict | None:
    """The analytic model of the module docstring for one ours row (None when it cannot apply)."""
    if row.get("kind") != "ours" or not row.get("rounds") or "total_ms" not in row or new_tokens < 2:
        return None
    ar_total, ar_ttft = ar["total_ms"]["median"], ar["ttft_ms"]["median"]
    stage, rounds = row["stage_ms"], row["rounds"]
    step = (ar_total - ar_ttft) / (new_tokens - 1)
    per_round = new_tokens / rounds
    c_verify = (stage["verify.forward"] + stage["verify.accept"] + stage["kv.compact"]) / rounds
    c_draft = stage["draft.step"] / rounds
    ttft_pred = max(ar_ttft, stage["draft.prefill"]) + c_verify
    total_pred = ttft_pred + (new_tokens / per_round - 1) * (c_verify + c_draft)
    total, ttft = row["total_ms"]["median"], row["ttft_ms"]["median"]
    predicted, measured = ar_total / total_pred, ar_total / total
    return dict(
        T_step_ms=step,
        E_tokens_per_round=per_round,
        c_verify_ms=c_verify,
        c_draft_ms=c_draft,
        predicted_decode_speedup=per_round * step / (c_verify + c_draft) if c_verify + c_draft > 0 else None,
        ttft_pred_ms=ttft_pred,
        total_pred_ms=total_pred,
        predicted_speedup=predicted,
        measured_speedup=measured,
        system_efficiency=measured / predicted,
        ttft_efficiency=ttft_pred / ttft if ttft else None,
    )


def variants_for(spec: DrafterSpec, args) -> list[Variant]:
    found = []
    if spec.hf_assisted:
        found += [Variant("hf_assisted", spec.name, gamma) for gamma in args.gammas]
        if not args.quick:
            found.append(Variant("hf_assisted", spec.name, None))
    found += [Variant("ours", spec.name, gamma) for gamma in args.gammas]
    if args.tree is not None:
        found.append(Variant("ours", spec.name, tree=args.tree))
    return found


# ----------------------------------------------------------------------------------------------
# Script mode
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("config", "variant", ""),
    ("ttft_med", "TTFT ms", ".1f"),
    ("total_med", "total ms", ".1f"),
    ("tps_med", "tok/s", ".1f"),
    ("speedup", "x ar", ".2f"),
    ("acceptance_rate", "accept", ".2f"),
    ("mean_accepted_length", "mean acc", ".2f"),
    ("free_tokens", "free", ".0f"),
    ("predicted", "x pred", ".2f"),
    ("efficiency", "sys eff", ".2f"),
    ("identical", "identical", ""),
)


def _table_rows(rows: list[dict]) -> list[dict]:
    shown = []
    for row in rows:
        if row.get("status") == "skipped":
            shown.append(dict(config=row["config"], identical="skipped"))
            continue
        model = row.get("analytic") or {}
        shown.append(
            dict(
                row,
                ttft_med=(row.get("ttft_ms") or {}).get("median"),
                total_med=(row.get("total_ms") or {}).get("median"),
                tps_med=(row.get("tokens_per_s") or {}).get("median"),
                speedup=row.get("speedup_vs_ar"),
                predicted=model.get("predicted_speedup"),
                efficiency=model.get("system_efficiency"),
                identical=str(row.get("tokens_identical", row.get("error", ""))),
            )
        )
    return shown


def _parse_tree(text: str) -> TreeDraft | None:
    if text.lower() in ("", "none", "off"):
        return None
    try:
        top_k, depth, max_nodes = (int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--tree takes TOP_K,DEPTH,MAX_NODES or 'none', got {text!r}"
        ) from error
    return TreeDraft(top_k, depth, max_nodes)


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from error


DRAFTERS_7B = ("eventgpt-1b", "eventgpt-7b", "llama-7b")


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_arg_parser(OP, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        help="tiny: tiny random models (CPU smoke; the default without CUDA); 7b: Video-LLaVA-7B-shaped "
        "target and EventGPT-1B/-7B drafters with random bf16 weights on the GPU (the default with CUDA)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="tokens per request (default: tiny 16, 7b 128; --quick: 8 / 64)"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed runs per variant (default: tiny 3, 7b 5; --quick: 2 / 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per variant before timing (default 1)"
    )
    parser.add_argument("--gammas", type=_parse_ints, default=[3, 5, 8], help="chain lengths, e.g. 3,5,8")
    parser.add_argument(
        "--tree",
        type=_parse_tree,
        default=TreeDraft(4, 5, 32),
        help="TreeDraft TOP_K,DEPTH,MAX_NODES or none (4,5,32)",
    )
    parser.add_argument(
        "--drafters",
        type=lambda text: [name for name in text.split(",") if name],
        help=f"7b preset only: which drafters to run, from {','.join(DRAFTERS_7B)} (default: all)",
    )
    parser.add_argument(
        "--free-token-budget", type=int, default=16, help="engine free_token_budget (default 16)"
    )
    parser.add_argument(
        "--backend",
        choices=("cuda", "triton", "reference"),
        help="force the engine's kernel backend (default: by device)",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 2:
        parser.error("--max-new-tokens must be >= 2 (the analytic model needs a decode step)")
    if any(gamma < 1 for gamma in args.gammas):
        parser.error("--gammas must be positive")
    if args.drafters is not None and any(name not in DRAFTERS_7B for name in args.drafters):
        parser.error(f"--drafters: choose from {','.join(DRAFTERS_7B)}, got {','.join(args.drafters)}")
    return args


def run_drafter(spec: DrafterSpec, setup: Setup, args, device, reference) -> tuple[list[dict], list[str]]:
    """Build one drafter, run its variants, free it: (rows, problems)."""
    rows = []
    if not spec.hf_assisted:
        rows.append(
            dict(
                config=f"hf_assisted-{spec.name}",
                kind="hf_assisted",
                drafter=spec.name,
                backend="hf_assisted",
                status="skipped",
                reason=spec.hf_reason,
            )
        )
    try:
        built = list(spec.build())  # [drafter, adapter, drafter_inputs], emptied when done
    except Exception as error:  # one drafter that cannot be built must not lose the others
        message = f"{type(error).__name__}: {error}"
        rows.append(dict(config=spec.name, drafter=spec.name, backend="-", error=message))
        return rows, [f"{spec.name}: building the drafter failed: {message}"]
    try:
        spec_rows, problems = run_configs(
            variants_for(spec, args),
            lambda variant: _measured(variant, setup, *built, args, device, reference),
        )
    finally:
        built.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows + spec_rows, problems


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.preset is None:
        args.preset = "7b" if torch.cuda.is_available() and not args.cpu else "tiny"
    if args.preset == "7b" and (args.cpu or not torch.cuda.is_available()):
        _require_cuda(torch.device("cpu"))
    tiny = args.preset == "tiny"
    if args.max_new_tokens is None:
        args.max_new_tokens = (8 if tiny else 64) if args.quick else (16 if tiny else 128)
    if args.repeats is None:
        args.repeats = (2 if tiny else 3) if args.quick else (3 if tiny else 5)
    device, smoke, info = start_run(args)
    torch.manual_seed(SEED)
    setup = tiny_setup(device) if tiny else seven_b_setup(device, args.drafters or list(DRAFTERS_7B))
    print(f"preset {setup.preset}: {setup.details['target']}; {ACCEPTANCE_NOTES[setup.preset]}", flush=True)

    rows, problems = [], []
    ar_variant = Variant("ar")
    ar_rows, found = run_configs(
        [ar_variant], lambda v: _measured(v, setup, None, None, None, args, device, None)
    )
    problems += found
    ar_row = ar_rows[0]
    rows += ar_rows
    reference = ar_row.pop("_tokens", None)
    if reference is None:
        problems.append("the autoregressive baseline failed; nothing to compare against")
    else:
        for spec in setup.drafters:
            spec_rows, found = run_drafter(spec, setup, args, device, reference)
            rows += spec_rows
            problems += found
        for row in rows:
            row.pop("_tokens", None)
            if "total_ms" in row and ar_row.get("total_ms"):
                row["speedup_vs_ar"] = ar_row["total_ms"]["median"] / row["total_ms"]["median"]
                if row.get("ttft_ms") and ar_row.get("ttft_ms"):
                    row["ttft_speedup_vs_ar"] = ar_row["ttft_ms"]["median"] / row["ttft_ms"]["median"]
            model = analytic(row, ar_row, args.max_new_tokens) if ar_row.get("ttft_ms") else None
            if model is not None:
                row["analytic"] = model
                row["system_efficiency"] = model["system_efficiency"]

    print()
    print(format_table(_table_rows(rows), TABLE_COLUMNS))
    print(f"acceptance: {ACCEPTANCE_NOTES[setup.preset]}")
    for row in rows:
        if row.get("status") == "skipped":
            print(f"skipped {row['config']}: {row['reason']}")
    if smoke:
        print(SMOKE_BANNER)

    drafters = {
        spec.name: dict(
            description=spec.description,
            parameters=spec.parameters,
            hf_assisted=spec.hf_assisted,
            hf_assisted_reason=spec.hf_reason or None,
        )
        for spec in setup.drafters
    }
    payload = results_payload(
        OP,
        smoke,
        info,
        ["ar", "hf_assisted", "ours"],
        [row["config"] + ": " + row["reason"] for row in rows if row.get("status") == "skipped"],
        rows,
        problems,
        preset=setup.preset,
        dtype=str(setup.dtype).replace("torch.", ""),
        models=dict(setup.details, drafters=drafters),
        acceptance_note=ACCEPTANCE_NOTES[setup.preset],
        request=dict(
            batch=1,
            max_new_tokens=args.max_new_tokens,
            temperature=0.0,
            eos="disabled (every variant generates max_new_tokens)",
            repeats=args.repeats,
            warmup=args.warmup,
            free_token_budget=args.free_token_budget,
            engine_backend=args.backend,
            gammas=args.gammas,
            tree=None if args.tree is None else dataclasses.asdict(args.tree),
        ),
        timing_details=dict(
            total="wall clock around the generate call, device synchronised before and after",
            ttft="ours: engine stats ttft_ms; HF: first new token handed to a generate() streamer",
            preprocessing="not timed (done once before the runs)",
        ),
        analytic_model=ANALYTIC_MODEL,
    )
    return finish_run(OP, args.out, smoke, info, payload, problems)


def _measured(variant, setup, drafter, adapter, drafter_inputs, args, device, reference):
    """run_configs callback: ([row], problems); a failing variant becomes an error row."""
    try:
        row, problems = measure(variant, setup, drafter, adapter, drafter_inputs, args, device, reference)
    except Exception as error:  # one broken variant must not lose the others' numbers
        message = f"{type(error).__name__}: {error}"
        row = dict(
            config=str(variant),
            kind=variant.kind,
            drafter=variant.drafter,
            backend=variant.kind,
            error=message,
        )
        return [row], [f"{variant}: {message}"]
    return [row], problems


# ----------------------------------------------------------------------------------------------
# pytest: `pytest bench/bench_e2e.py` (bench/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------


def test_script_smoke(tmp_path) -> None:
    """The tiny preset on CPU end to end: greedy outputs identical to target.generate, JSON complete."""
    assert main(["--preset", "tiny", "--cpu", "--quick", "--out", str(tmp_path)]) == 0
    written = list(tmp_path.glob(f"{OP}-*.json"))
    assert len(written) == 1
    payload = json.loads(written[0].read_text())
    assert payload["smoke_test"] is True and payload["preset"] == "tiny" and not payload["problems"]
    for key in ("device", "torch", "command", "git", "date"):
        assert key in payload["environment"], key
    assert set(payload["analytic_model"]) >= {"predicted_speedup", "system_efficiency", "ttft_pred"}
    rows = {row["config"]: row for row in payload["results"]}
    assert "ar" in rows and "hf_assisted-llama-tiny-g3" in rows
    assert (
        rows["hf_assisted-eventgpt-tiny"]["status"] == "skipped"
        and rows["hf_assisted-eventgpt-tiny"]["reason"]
    )
    ours = [row for row in rows.values() if row.get("kind") == "ours"]
    assert {row["drafter"] for row in ours} == {"eventgpt-tiny", "llama-tiny"}
    assert any(row["draft"].startswith("TreeDraft") for row in ours)
    for row in rows.values():
        if row.get("status") == "skipped":
            continue
        assert "error" not in row, row
        assert row["tokens_identical"] is True, row["config"]
        assert row["new_tokens"] == payload["request"]["max_new_tokens"]
        for key in ("total_ms", "ttft_ms", "tokens_per_s"):
            assert set(row[key]) == {"median", "p20", "p80"}, (row["config"], key)
            assert row[key]["p20"] <= row[key]["median"] <= row[key]["p80"]
    for row in ours:
        for key in ("acceptance_rate", "mean_accepted_length", "free_tokens", "rounds", "system_efficiency"):
            assert row[key] is not None, (row["config"], key)
        assert set(row["stage_ms"]) == set(STAGES) and not row["fallback"]
        assert 0.0 <= row["acceptance_rate"] <= 1.0
        assert row["analytic"]["predicted_speedup"] > 0
    # The drafters copy the target's LM, so some drafts must be accepted somewhere in the run.
    assert any(row["mean_accepted_length"] > 0 for row in ours)


if __name__ == "__main__":
    sys.exit(main())
