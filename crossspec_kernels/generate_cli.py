"""``crossspec generate``: cross-modal speculative decoding with real checkpoints from local folders.

    crossspec generate --target DIR --drafter DIR [--adapter DIR] --video FILE --events FILE --question TEXT
                       [--tree TOP_K,DEPTH,MAX_NODES | --gamma N] [--max-new-tokens N] [--temperature T]
                       [--seed S] [--device auto|cpu|cuda[:i]] [--dtype auto|float32|float16|bfloat16]
                       [--window-us T0,T1] [--sensor-size H,W] [--trust-pickle] [--compare] [--json PATH]

What it does, in order:

1. Reads the clip (``.npy``/``.pt`` uint8 [T, H, W, 3] or [T, 3, H, W]; ``.mp4`` and other containers
   when PyAV is installed) and samples the target's number of frames uniformly (first to last frame).
2. Reads the events (DSEC ``.h5`` with an optional ``--window-us`` in file time, or an EventGPT
   ``.npy``, read with a restricted unpickler unless ``--trust-pickle``), rasterises them with ``events_to_frames(representation="eventgpt")`` into the drafter's
   ``num_frames`` frames and preprocesses those to its CLIP image size (``preprocess_event_frames``).
3. Reads both models' configs (no weights), the tokenizers and the adapter, checks that the two
   tokenizers agree on every id both models share and preprocesses the prompt, then loads the target
   (``VideoLlavaForConditionalGeneration``) and the drafter (``EventGPTForCausalLM``): every input is
   checked before any model weights are read.
4. Builds the prompts: the target's ``"USER: <video>\\n{question} ASSISTANT:"`` and the drafter's
   Vicuna-v1 prompt (``EventGPTPromptBuilder``), runs ``CrossSpecEngine.generate`` and prints the
   answer and its statistics. ``--compare`` first runs ``target.generate`` greedily on the same inputs
   (before the engine switches the target's attention) and reports whether the tokens are identical.

Target preprocessing (``--processor``): ``hf`` uses the folder's ``VideoLlavaProcessor``, which needs
pillow and torchvision. ``builtin`` does the same work in PyTorch: the video processor's settings are
read from the folder (``video_preprocessor_config.json`` or ``preprocessor_config.json``: shortest-edge
resize, center crop, rescale, normalize; ``processor_config.json``: patch size and extra tokens per
frame), missing ones default to the model config's image and patch size and CLIP's mean/std; frames
are resized like torchvision's tensor path (antialiased, bicubic unless the config says otherwise,
rounded back to uint8), and ``<video>`` is expanded to frames x ((crop / patch)^2 + extra) placeholder
tokens, as the processor does, before the target's tokenizer runs. The pixel values match the
processor's up to resampling round-off, and the token ids exactly. ``auto`` (default) uses ``hf``
and falls back to ``builtin`` (with a note on stderr) when the processor cannot be imported or the
folder has no processor files.

User errors (missing files, wrong types, unreadable checkpoints, mismatched vocabularies, a pickle
naming code) end with one line on stderr and exit status 2. Status lines (loading, generating, the
baseline) go to stderr; stdout holds only the summary, the answer and its statistics.

numpy, torch, transformers and the models are imported inside the functions that run the command:
``crossspec --help`` builds this parser and must not pay for them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from crossspec_kernels.cli_common import add_command, output_file
from crossspec_kernels.generate_inputs import (
    BuiltinVideoProcessor,
    GenerateError,
    existing_dir,
    existing_file,
    load_events,
    load_video,
    target_num_frames,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

PROG = "crossspec generate"
BACKEND_CHOICES = ("auto", "cuda", "triton", "reference")
# --dtype names; each is the name of a torch dtype (torch.float32, ...), looked up when the command runs.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
PROCESSOR_CHOICES = ("auto", "hf", "builtin")
DEFAULT_GAMMA = 5
TARGET_TEMPLATE = "USER: <video>\n{question} ASSISTANT:"
# Files a Video-LLaVA folder keeps its processor settings in (any one of them means "has a processor").
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
_VOCAB_EXAMPLES = 5


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------


def _ints(text: str, count: int, what: str) -> list[int]:
    parts = text.split(",")
    try:
        values = [int(part.strip()) for part in parts]
    except ValueError:
        values = []
    if len(values) != count or len(parts) != count:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def parse_tree(text: str):
    """``"TOP_K,DEPTH,MAX_NODES"`` -> TreeDraft (its own range checks name the bad field)."""
    from crossspec_kernels.runtime.draft_config import TreeDraft

    top_k, depth, max_nodes = _ints(text, 3, "TOP_K,DEPTH,MAX_NODES (three ints, e.g. 4,5,32)")
    try:
        return TreeDraft(top_k=top_k, depth=depth, max_nodes=max_nodes)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def parse_gamma(text: str):
    from crossspec_kernels.runtime.draft_config import ChainDraft

    (gamma,) = _ints(text, 1, "an int (draft tokens per round)")
    try:
        return ChainDraft(gamma=gamma)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def parse_window(text: str) -> tuple[int, int]:
    t0, t1 = _ints(text, 2, "T0,T1 (two ints, microseconds)")
    if t0 >= t1:
        raise argparse.ArgumentTypeError(f"the window [T0, T1) needs T0 < T1, got T0={t0}, T1={t1}")
    return t0, t1


def parse_sensor_size(text: str) -> tuple[int, int]:
    height, width = _ints(text, 2, "H,W (two positive ints)")
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"H and W must be positive, got {height},{width}")
    return height, width


def _positive_int(text: str) -> int:
    (value,) = _ints(text, 1, "a positive int")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite float >= 0, got {text!r}")
    return value


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``generate`` to a subparsers object; the parsed namespace runs with ``args.func(args)``."""
    parser = add_command(  # the shared formatter shows defaults; the epilog lists the exit codes
        subparsers,
        "generate",
        help="speculative generation with a Video-LLaVA target and an EventGPT drafter (local folders)",
        description="Answer a question about a clip with a Video-LLaVA target, drafting with an\n"
        "EventGPT-style drafter that reads the clip's events; greedy output is the target's own.",
    )
    models = parser.add_argument_group("models (local folders, nothing is downloaded)")
    models.add_argument("--target", required=True, metavar="DIR", help="Video-LLaVA folder (from_pretrained)")
    models.add_argument(
        "--drafter", required=True, metavar="DIR", help="EventGPTForCausalLM folder with its tokenizer"
    )
    models.add_argument("--adapter", metavar="DIR", help="adapter folder (default: identity)")
    models.add_argument(
        "--feature-head",
        metavar="DIR",
        help="a feature head (EAGLE-style: B1 on the target's features, L5 on the event drafter's, L5F on "
        "both) that drafts from the first verification on; the event drafter then drafts only during the "
        "target's prefill (and, for L5/L5F, computes the head's features)",
    )
    models.add_argument(
        "--draft-vocab",
        metavar="FILE",
        help="JSON list of target token ids the feature head may propose (e.g. its draft_vocab.json)",
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--video",
        required=True,
        metavar="FILE",
        help="clip: .npy/.pt uint8 [T, H, W, 3] or [T, 3, H, W]; .mp4 etc. with PyAV installed",
    )
    inputs.add_argument("--events", required=True, metavar="FILE", help="DSEC events .h5 or EventGPT .npy")
    inputs.add_argument("--question", required=True, help="the question about the clip")
    inputs.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load an EventGPT .npy --events file with the full pickle: it may run any code the file "
        "names, so only for files you trust (default: only dicts, lists and numpy arrays are built)",
    )
    inputs.add_argument(
        "--window-us",
        type=parse_window,
        metavar="T0,T1",
        help="events with T0 <= t < T1 (µs, the file's time base; default: all)",
    )
    inputs.add_argument(
        "--sensor-size",
        type=parse_sensor_size,
        metavar="H,W",
        help="event sensor (height, width); default 480,640 for DSEC .h5, inferred for .npy",
    )
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument(
        "--tree", type=parse_tree, metavar="TOP_K,DEPTH,MAX_NODES", help="draft a dynamic tree"
    )
    drafting.add_argument(
        "--gamma", type=parse_gamma, metavar="N", help=f"draft a chain of N tokens (default: {DEFAULT_GAMMA})"
    )
    run = parser.add_argument_group("generation")
    run.add_argument(
        "--max-new-tokens", type=_positive_int, default=64, metavar="N", help="tokens to generate at most"
    )
    run.add_argument(
        "--temperature", type=_temperature, default=0.0, metavar="T", help="sampling temperature, 0 = greedy"
    )
    run.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
    run.add_argument(
        "--sampling",
        choices=("rejection", "coupled"),
        default="rejection",
        help="rejection: most accepted drafts; coupled: the answer depends on the seed only (runtime.sampling)",
    )
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    run.add_argument(
        "--dtype",
        choices=("auto", *DTYPE_NAMES),
        default="auto",
        help="model dtype (auto: float16 on CUDA, float32 on CPU)",
    )
    run.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="force the kernels' backend (auto: each op picks from the device)",
    )
    run.add_argument(
        "--processor",
        choices=PROCESSOR_CHOICES,
        default="auto",
        help="target preprocessing: hf (VideoLlavaProcessor), builtin (PyTorch), auto (hf if it loads)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--compare", action="store_true", help="also run target.generate greedily: same tokens? timings"
    )
    out.add_argument("--json", metavar="PATH", help="write the statistics and texts to this JSON file")
    out.add_argument("--profile", metavar="PATH", help="write a torch profiler trace of the engine run")
    parser.set_defaults(func=run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m crossspec_kernels.generate_cli generate ...`` (the same as ``crossspec generate``)."""
    parser = argparse.ArgumentParser(prog="crossspec")
    add_generate_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


# ----------------------------------------------------------------------------------------------
# Inputs: video and events
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda if available), cpu or cuda[:i], checked against what torch sees."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise GenerateError(f"--device {name!r} is not a device ({error})") from error
    if device.type not in ("cpu", "cuda"):
        raise GenerateError(f"--device must be auto, cpu or cuda[:i], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerateError(f"--device {name} asked for, but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GenerateError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _model_type(folder: Path, what: str) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise GenerateError(f"{what} {folder}: no config.json; expected a save_pretrained model folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GenerateError(f"{what} {folder}: config.json is not readable JSON ({error})") from error
    if not isinstance(config, dict):
        raise GenerateError(f"{what} {folder}: config.json must hold a JSON object")
    return str(config.get("model_type"))


def _config_from_pretrained(cls, folder: Path, what: str):
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises many types for a config it cannot build
        raise GenerateError(
            f"{what} {folder}: cannot read its config ({type(error).__name__}: {_first_line(error)})"
        ) from error


def load_target_config(folder: Path):
    """The target's config (no weights read), after checking that the folder holds a Video-LLaVA."""
    from transformers import VideoLlavaConfig

    model_type = _model_type(folder, "--target")
    if model_type != "video_llava":
        raise GenerateError(
            f"--target {folder}: holds a {model_type!r} model; expected a Video-LLaVA folder "
            "(model_type 'video_llava', VideoLlavaForConditionalGeneration)"
        )
    return _config_from_pretrained(VideoLlavaConfig, folder, "--target")


def load_drafter_config(folder: Path):
    """The drafter's config (no weights read), after checking that the folder holds an EventGPT drafter."""
    from crossspec_kernels.models.eventgpt import EventGPTConfig

    model_type = _model_type(folder, "--drafter")
    if model_type != EventGPTConfig.model_type:
        raise GenerateError(
            f"--drafter {folder}: holds a {model_type!r} model; expected an EventGPTForCausalLM folder "
            f"(model_type {EventGPTConfig.model_type!r}; convert an original EventGPT checkpoint with "
            "crossspec_kernels.models.eventgpt_convert, then save_pretrained)"
        )
    return _config_from_pretrained(EventGPTConfig, folder, "--drafter")


def _from_pretrained(cls, folder: Path, what: str, dtype: torch.dtype, device: torch.device):
    try:
        model = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except Exception as error:  # transformers/safetensors raise many types for a bad checkpoint
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise GenerateError(
            f"{what} {folder}: cannot load the checkpoint ({type(error).__name__}: {first_line})"
        ) from error
    return model.to(device).eval()


def load_target(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import VideoLlavaForConditionalGeneration

    model_type = _model_type(folder, "--target")
    if model_type != "video_llava":
        raise GenerateError(
            f"--target {folder}: holds a {model_type!r} model; expected a Video-LLaVA folder "
            "(model_type 'video_llava', VideoLlavaForConditionalGeneration)"
        )
    return _from_pretrained(VideoLlavaForConditionalGeneration, folder, "--target", dtype, device)


def load_drafter(folder: Path, dtype: torch.dtype, device: torch.device):
    from crossspec_kernels.models.eventgpt import EventGPTConfig, EventGPTForCausalLM

    model_type = _model_type(folder, "--drafter")
    if model_type != EventGPTConfig.model_type:
        raise GenerateError(
            f"--drafter {folder}: holds a {model_type!r} model; expected an EventGPTForCausalLM folder "
            f"(model_type {EventGPTConfig.model_type!r}; convert an original EventGPT checkpoint with "
            "crossspec_kernels.models.eventgpt_convert, then save_pretrained)"
        )
    return _from_pretrained(EventGPTForCausalLM, folder, "--drafter", dtype, device)


def load_tokenizer(folder: Path, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # missing files, unknown tokenizer class, ...: all one user error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise GenerateError(
            f"{what} {folder}: cannot load a tokenizer from it ({type(error).__name__}: {first_line})"
        ) from error


def check_vocabularies(target_tokenizer, drafter_tokenizer, target_vocab: int, drafter_vocab: int) -> int:
    """The tokenizers must map every id below min(target_vocab, drafter_vocab) to the same token.

    Returns the number of ids compared; raises GenerateError naming a few differing ids otherwise.
    """
    shared = min(target_vocab, drafter_vocab)
    target_tokens = {index: token for token, index in target_tokenizer.get_vocab().items() if index < shared}
    drafter_tokens = {
        index: token for token, index in drafter_tokenizer.get_vocab().items() if index < shared
    }
    differing = sorted(
        i for i in set(target_tokens) | set(drafter_tokens) if target_tokens.get(i) != drafter_tokens.get(i)
    )
    if differing:
        examples = ", ".join(
            f"id {i}: target {target_tokens.get(i)!r} vs drafter {drafter_tokens.get(i)!r}"
            for i in differing[:_VOCAB_EXAMPLES]
        )
        raise GenerateError(
            f"the target's and the drafter's tokenizers disagree on {len(differing)} of the {shared} ids the "
            f"models share ({examples}); drafts would be scored as other words: use a drafter trained on "
            "the target's vocabulary"
        )
    return shared


def load_adapter_checked(folder: str, drafter, target, dtype: torch.dtype, device: torch.device):
    """The adapter in ``folder`` (None: identity), checked against the models' (or configs') hidden sizes."""
    from crossspec_kernels.models.adapters import load_adapter

    d_draft = int(getattr(drafter, "config", drafter).get_text_config().hidden_size)
    d_target = int(getattr(target, "config", target).get_text_config().hidden_size)
    if folder is None:
        if d_draft != d_target:
            raise GenerateError(
                f"the drafter's hidden size is {d_draft} and the target's {d_target}: pass --adapter DIR "
                "(an adapter mapping drafter hidden states into the target's, see `crossspec adapter train`)"
            )
        return None
    path = existing_dir(folder, "--adapter")
    try:
        adapter = load_adapter(path, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as error:
        raise GenerateError(f"--adapter {folder}: {error}") from error
    if (adapter.config.d_draft, adapter.config.d_target) != (d_draft, d_target):
        raise GenerateError(
            f"--adapter {folder}: maps hidden size {adapter.config.d_draft} -> {adapter.config.d_target}, "
            f"but the drafter's hidden size is {d_draft} and the target's {d_target}"
        )
    return adapter.eval()


def load_feature_head_checked(
    folder: str | None, target, dtype: torch.dtype, device: torch.device, drafter=None
):
    """The feature head in ``folder`` (None: none), checked against the target's config (and, for
    an L5/L5F head, the drafter's hidden size)."""
    from crossspec_kernels.models.adapters import FEATURE_HEAD_KINDS, load_adapter

    if folder is None:
        return None
    try:
        head = load_adapter(folder, device=device, dtype=dtype, expected_kind=FEATURE_HEAD_KINDS)
    except (FileNotFoundError, ValueError) as error:
        raise GenerateError(f"--feature-head {folder}: {error}") from error
    text = getattr(target, "config", target).get_text_config()
    mine = (head.config.d_target, head.config.vocab_size)
    if mine != (int(text.hidden_size), int(text.vocab_size)):
        raise GenerateError(
            f"--feature-head {folder}: a head for hidden size {mine[0]} and vocabulary {mine[1]}, but the "
            f"target has {text.hidden_size} and {text.vocab_size}"
        )
    if head.config.kind != "b1" and drafter is not None:
        d_draft = int(getattr(drafter, "config", drafter).get_text_config().hidden_size)
        if head.config.d_draft != d_draft:
            raise GenerateError(
                f"--feature-head {folder}: an {head.config.kind} head reads drafter features of size "
                f"{head.config.d_draft}, but the drafter's hidden size is {d_draft}"
            )
    return head.eval()


def load_draft_vocab(path: str) -> torch.Tensor:
    """--draft-vocab: a JSON list of distinct token ids (checked against the vocabulary by the engine)."""
    import torch

    existing_file(path, "--draft-vocab")
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise GenerateError(f"--draft-vocab {path}: not a JSON list of token ids ({error})") from error
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    ):
        raise GenerateError(f"--draft-vocab {path}: expected a non-empty JSON list of ints")
    return torch.tensor(ids, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Target preprocessing
# ----------------------------------------------------------------------------------------------


def missing_processor_dependencies() -> list[str]:
    """The modules VideoLlavaProcessor needs (its image and video processors) that are not installed."""
    return [name for name in ("PIL", "torchvision") if importlib.util.find_spec(name) is None]


def target_preprocessor(mode: str, folder: Path, target):
    """(callable(text, frames) -> target inputs, its tokenizer, a description, a note or None).

    ``target``: the Video-LLaVA model or its config (only the config is read)."""
    has_processor_files = any((folder / name).is_file() for name in PROCESSOR_FILES)
    note = None
    missing = missing_processor_dependencies()
    if mode == "hf" and missing:
        raise GenerateError(
            f"--processor hf: VideoLlavaProcessor cannot be imported here (it needs pillow and torchvision; "
            f"missing: {', '.join(missing)}); install them, or use --processor builtin"
        )
    if mode == "auto" and missing:
        note = (
            f"VideoLlavaProcessor needs pillow and torchvision (missing here: {', '.join(missing)}): using "
            "the built-in PyTorch preprocessing (same settings, same token ids)"
        )
    elif mode == "auto" and not has_processor_files:
        note = f"--target {folder} has no processor files: using the built-in preprocessing with the model config"
    elif mode in ("auto", "hf"):
        from transformers import VideoLlavaProcessor

        try:
            processor = VideoLlavaProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # missing or broken processor files
            raise GenerateError(
                f"--target {folder}: cannot load its VideoLlavaProcessor ({type(error).__name__}: "
                f"{_first_line(error)}); --processor builtin does without it"
            ) from error

        def run(text: str, frames: np.ndarray) -> dict:
            encoded = processor(text=text, videos=frames, return_tensors="pt")
            return {key: encoded[key] for key in ("input_ids", "attention_mask", "pixel_values_videos")}

        return run, processor.tokenizer, "VideoLlavaProcessor", None
    tokenizer = load_tokenizer(folder, "--target")
    builtin = BuiltinVideoProcessor(folder, target, tokenizer)
    return builtin, tokenizer, f"built-in PyTorch preprocessing ({builtin.source})", note


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def format_stats(stats: dict, baseline: dict | None) -> str:
    rows = [
        ("acceptance rate", f"{stats['acceptance_rate']:.3f}"),
        ("mean accepted length", f"{stats['mean_accepted_length']:.2f} draft tokens per round"),
        ("tokens per round", f"{stats['tokens_per_round']:.2f}"),
        ("rounds", str(stats["rounds"])),
        (
            "free tokens",
            f"{stats['free_tokens']} drafted during the target's prefill, "
            f"{stats['free_tokens_accepted']:.0f} accepted",
        ),  # fmt: skip
        ("TTFT", f"{stats['ttft_ms']:.1f} ms"),
        ("tokens/s", f"{stats['tokens_per_s']:.1f}"),
        ("total", f"{stats['total_ms']:.1f} ms"),
    ]
    if stats.get("fallback"):
        rows.append(("drafter fallback", str(stats.get("fallback_reason"))))
    for stage, ms in stats.get("stage_ms", {}).items():
        rows.append((f"  {stage}", f"{ms:.1f} ms"))
    if baseline is not None:
        rows += [
            ("target.generate", f"{baseline['total_ms']:.1f} ms, {baseline['tokens_per_s']:.1f} tokens/s"),
            (
                "speedup",
                f"{baseline['total_ms'] / stats['total_ms']:.2f}x" if stats["total_ms"] > 0 else "n/a",
            ),
            ("identical tokens", baseline["identical_text"]),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _run_baseline(target, target_inputs, max_new_tokens, eos, device) -> tuple[torch.Tensor, float]:
    import torch

    prompt_len = target_inputs["input_ids"].shape[1]
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = target.generate(
            **target_inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=None,
        )
    _sync(device)
    return output[0, prompt_len:].cpu(), (time.perf_counter() - start) * 1e3


def _status(message: str) -> None:
    """A progress line on stderr, so stdout (the answer, the statistics) stays clean for pipes."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run_generate(args: argparse.Namespace) -> int:
    """Run a parsed ``generate`` command; a user error prints one line on stderr and exits with 2."""
    try:
        return _run(args)
    except GenerateError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise


def _run(args: argparse.Namespace) -> int:
    import torch

    from crossspec_kernels.models.eventgpt import EventGPTPromptBuilder, preprocess_event_frames
    from crossspec_kernels.ops.events_to_frames import events_to_frames
    from crossspec_kernels.runtime import ChainDraft, CrossSpecEngine

    # Cheap checks first: every path, before any model is read.
    target_dir = existing_dir(args.target, "--target")
    drafter_dir = existing_dir(args.drafter, "--drafter")
    if args.adapter is not None:
        existing_dir(args.adapter, "--adapter")
    if args.feature_head is not None:
        existing_dir(args.feature_head, "--feature-head")
    elif args.draft_vocab is not None:
        raise GenerateError("--draft-vocab needs --feature-head (it restricts the head's proposals)")
    draft_vocab = None if args.draft_vocab is None else load_draft_vocab(args.draft_vocab)
    existing_file(args.video, "--video")
    existing_file(args.events, "--events")
    if not args.question.strip():
        raise GenerateError("--question is empty")
    if args.json:
        output_file(args.json, "--json")
    if args.profile:  # the trace is written after the run: its folder must exist now
        output_file(args.profile, "--profile")
    device = resolve_device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype != "auto"
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    backend = None if args.backend == "auto" else args.backend
    draft = args.tree or args.gamma or ChainDraft(DEFAULT_GAMMA)
    torch.manual_seed(args.seed)

    # Every input file, config, tokenizer and the adapter, before any model weights are read.
    events, window = load_events(
        args.events, args.window_us, args.sensor_size, trust_pickle=args.trust_pickle
    )
    if len(events) == 0:
        raise GenerateError(f"--events {args.events}: no events in the window [{window[0]}, {window[1]}) µs")
    target_config = load_target_config(target_dir)
    drafter_config = load_drafter_config(drafter_dir)
    num_frames, per_frame = target_num_frames(target_config)
    video, clip_length = load_video(args.video, num_frames)
    preprocess, target_tokenizer, preprocess_name, note = target_preprocessor(
        args.processor, target_dir, target_config
    )
    if note:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    drafter_tokenizer = load_tokenizer(drafter_dir, "--drafter")
    shared = check_vocabularies(
        target_tokenizer,
        drafter_tokenizer,
        int(target_config.get_text_config().vocab_size),
        int(drafter_config.text_config.vocab_size),
    )
    target_inputs = preprocess(TARGET_TEMPLATE.format(question=args.question), video)
    video_tokens = int((target_inputs["input_ids"] == target_config.video_token_index).sum())
    expected_tokens = int(target_inputs["pixel_values_videos"].shape[1]) * per_frame
    if video_tokens != expected_tokens:
        raise GenerateError(
            f"--target {target_dir}: the processor expands <video> to {video_tokens} tokens, but the model "
            f"encodes {expected_tokens} (patch size or extra tokens per frame disagree with the model config)"
        )
    adapter = load_adapter_checked(args.adapter, drafter_config, target_config, dtype, device)
    head = load_feature_head_checked(args.feature_head, target_config, dtype, device, drafter_config)

    # Models.
    _status(f"loading target from {target_dir} ...")
    start = time.perf_counter()
    target = load_target(target_dir, dtype, device)
    _status(f"loaded target in {time.perf_counter() - start:.1f} s")
    _status(f"loading drafter from {drafter_dir} ...")
    start = time.perf_counter()
    drafter = load_drafter(drafter_dir, dtype, device)
    _status(f"loaded drafter in {time.perf_counter() - start:.1f} s")

    # Inputs on the device.
    target_inputs = {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in target_inputs.items()
    }
    drafter_config = drafter.config
    kernel_backend = None if backend == "cuda" else backend  # events_to_frames has its own CUDA kernel
    events_on_device = events.to(device)
    raster = events_to_frames(
        events_on_device.x,
        events_on_device.y,
        events_on_device.t,
        events_on_device.p,
        sensor_size=events.sensor_size,
        representation="eventgpt",
        num_frames=drafter_config.num_frames,
        backend=kernel_backend,
    )
    event_pixels = preprocess_event_frames(raster, drafter_config.vision_config.image_size)
    builder = EventGPTPromptBuilder(drafter_config, tokenizer=drafter_tokenizer)
    drafter_ids = builder(args.question)[None].to(device)
    drafter_inputs = {
        "input_ids": drafter_ids,
        "attention_mask": torch.ones_like(drafter_ids),
        "event_pixel_values": event_pixels[None].to(device=device, dtype=dtype),
    }

    print(
        f"{PROG}: target {target_dir} ({preprocess_name}), drafter {drafter_dir}, adapter "
        f"{args.adapter or 'identity'}; {_describe_draft(draft)}; {device} {str(dtype).replace('torch.', '')}, "
        f"backend {args.backend}"
    )
    clip = f"{clip_length} frames" if clip_length >= 0 else "decoded with PyAV"
    print(
        f"video {args.video} ({clip}) -> {num_frames} frames, {video_tokens} video tokens, prompt "
        f"{target_inputs['input_ids'].shape[1]} tokens; events {args.events}: {len(events)} events in "
        f"[{window[0]}, {window[1]}) µs, sensor {events.sensor_size[0]}x{events.sensor_size[1]} -> "
        f"{drafter_config.num_frames} frames, drafter prompt {drafter_ids.shape[1]} tokens; vocabularies agree "
        f"on {shared} ids"
    )

    eos = getattr(target.generation_config, "eos_token_id", None)
    baseline = None
    if args.compare:  # before the engine switches the target's attention to "crossspec"
        _status(f"baseline: target.generate greedy, up to {args.max_new_tokens} tokens ...")
        baseline_tokens, baseline_ms = _run_baseline(target, target_inputs, args.max_new_tokens, eos, device)
        _status(f"baseline: {len(baseline_tokens)} tokens in {baseline_ms / 1e3:.1f} s")

    _status(
        f"generating (CrossSpecEngine, {_describe_draft(draft)}, backend {args.backend}), up to "
        f"{args.max_new_tokens} tokens ..."
    )
    start = time.perf_counter()
    try:
        engine = CrossSpecEngine(
            target,
            drafter,
            adapter,
            draft=draft,
            backend=backend,
            feature_head=head,
            draft_vocab=None if draft_vocab is None else draft_vocab.to(device),
        )
        _sync(device)
        output = engine.generate(
            target_inputs,
            drafter_inputs,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            sampling=args.sampling,
            profile=args.profile or False,
        )
    except ValueError as error:
        raise GenerateError(f"the engine refused the inputs: {error}") from error
    tokens = output.sequences[0].cpu()
    _status(f"generated {len(tokens)} tokens in {time.perf_counter() - start:.1f} s")
    answer = target_tokenizer.decode(tokens, skip_special_tokens=True).strip()
    stats = output.stats

    if args.compare:
        identical = torch.equal(baseline_tokens, tokens)
        if identical:
            verdict = f"yes ({len(tokens)} tokens)"
        else:
            common = min(len(baseline_tokens), len(tokens))
            differ = (baseline_tokens[:common] != tokens[:common]).nonzero()
            first = int(differ[0]) if len(differ) else common
            verdict = (
                f"no: first difference at token {first} ({len(baseline_tokens)} vs {len(tokens)} tokens)"
            )
            if args.temperature > 0:
                verdict += "; expected when sampling (the baseline is greedy)"
        baseline = {
            "total_ms": baseline_ms,
            "tokens_per_s": len(baseline_tokens) / (baseline_ms / 1e3) if baseline_ms > 0 else math.inf,
            "identical": identical,
            "identical_text": verdict,
            "tokens": [int(t) for t in baseline_tokens],
            "answer": target_tokenizer.decode(baseline_tokens, skip_special_tokens=True).strip(),
        }

    print(f"\nQ: {args.question}\nA: {answer}\n")
    print(format_stats(stats, baseline))
    if baseline is not None and not baseline["identical"]:
        print(f"target.generate answered: {baseline['answer']}")

    if args.json:
        payload = {
            "question": args.question,
            "answer": answer,
            "tokens": [int(t) for t in tokens],
            "stats": _finite(stats),
            "compare": _finite(baseline),
            "settings": {
                "target": str(target_dir),
                "drafter": str(drafter_dir),
                "adapter": args.adapter,
                "feature_head": args.feature_head,
                "draft_vocab": args.draft_vocab,
                "sampling": args.sampling,
                "video": args.video,
                "events": args.events,
                "window_us": list(window),
                "sensor_size": list(events.sensor_size),
                "draft": _describe_draft(draft),
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "seed": args.seed,
                "device": str(device),
                "dtype": str(dtype).replace("torch.", ""),
                "backend": args.backend,
                "preprocessing": preprocess_name,
                "num_video_frames": num_frames,
                "video_tokens": video_tokens,
            },
        }
        try:
            with open(args.json, "w") as file:
                json.dump(payload, file, indent=2)
                file.write("\n")
        except OSError as error:
            raise GenerateError(f"--json {args.json}: cannot write it ({error})") from error
        print(f"\nwrote {args.json}")
    return 0


def _describe_draft(draft) -> str:
    from crossspec_kernels.runtime import TreeDraft

    if isinstance(draft, TreeDraft):
        return f"tree top_k={draft.top_k} depth={draft.depth} max_nodes={draft.max_nodes}"
    return f"chain gamma={draft.gamma}"


if __name__ == "__main__":
    raise SystemExit(main())
