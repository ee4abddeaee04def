"""Inputs of ``crossspec generate``: the clip, the event recording, and the target's preprocessing.

``load_video`` reads ``.npy``/``.pt`` frames (or a container through PyAV) and samples them
uniformly; ``load_events`` reads a DSEC ``.h5`` window or an EventGPT ``.npy``;
``BuiltinVideoProcessor`` computes what ``VideoLlavaProcessor`` does, in PyTorch, for machines
without pillow and torchvision (see ``crossspec_kernels.generate_cli``'s docstring). Problems with
the user's files raise :class:`GenerateError`: one line, exit status 2.

numpy, torch and the models are imported inside the functions: ``crossspec generate --help`` imports
this module (through ``generate_cli``) and must not pay for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from crossspec_kernels.cli_common import UsageError as GenerateError  # one user-error type, exit 2

if TYPE_CHECKING:
    import numpy as np
    import torch

ARRAY_VIDEO_EXTENSIONS = (".npy", ".pt", ".pth")
CONTAINER_VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
EVENTGPT_EXTENSIONS = (".npy",)
DSEC_EXTENSIONS = (".h5", ".hdf5")
DEFAULT_DSEC_SENSOR_SIZE = (480, 640)
# PIL resampling codes in processor configs -> torch interpolation modes.
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def existing_file(path: str, what: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise GenerateError(f"{what} {path!r} does not exist")
    if not file.is_file():
        raise GenerateError(f"{what} {path!r} is not a file")
    return file


def existing_dir(path: str, what: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise GenerateError(f"{what} folder {path!r} does not exist")
    if not folder.is_dir():
        raise GenerateError(f"{what} {path!r} is not a folder")
    return folder


def _frames_hwc(array, path: Path) -> np.ndarray:
    """A uint8 [T, H, W, 3] or [T, 3, H, W] array/tensor -> contiguous uint8 [T, H, W, 3]."""
    import numpy as np
    import torch

    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if not isinstance(array, np.ndarray):
        raise GenerateError(f"--video {path}: expected an array or tensor, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise GenerateError(f"--video {path}: frames must be uint8 (0..255), got dtype {array.dtype}")
    if array.ndim != 4 or 3 not in (array.shape[-1], array.shape[1]):
        raise GenerateError(
            f"--video {path}: expected frames [T, H, W, 3] or [T, 3, H, W], got shape {tuple(array.shape)}"
        )
    if array.shape[-1] != 3:  # channels first
        array = array.transpose(0, 2, 3, 1)
    if 0 in array.shape:
        raise GenerateError(f"--video {path}: the clip is empty, shape {tuple(array.shape)}")
    return np.ascontiguousarray(array)


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over [0, total) from the first to the last frame
    (repeats when the clip has fewer frames)."""
    import numpy as np

    return [int(round(i)) for i in np.linspace(0, total - 1, num_frames)]


def _decode_with_av(path: Path, num_frames: int) -> np.ndarray:
    import numpy as np

    try:
        import av
    except ImportError as error:
        raise GenerateError(
            f"--video {path}: reading {path.suffix} files needs PyAV (pip install av); or convert the clip "
            "to a uint8 .npy [T, H, W, 3]"
        ) from error

    def decode(wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int]:
        """Frames whose index is in ``wanted`` (all when None), and how many frames were decoded."""
        kept: dict[int, np.ndarray] = {}
        count = 0
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise GenerateError(f"--video {path}: the file has no video stream")
            stream = container.streams.video[0]
            for index, frame in enumerate(container.decode(stream)):
                count = index + 1
                if wanted is None or index in wanted:
                    kept[index] = frame.to_ndarray(format="rgb24")
                if wanted is not None and index >= max(wanted):
                    break
        return kept, count

    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            total = int(streams[0].frames or 0) if streams else 0
        indices = sample_frame_indices(total, num_frames) if total > 0 else []
        kept, count = decode(set(indices)) if indices else ({}, 0)
        if not indices or len(kept) < len(set(indices)):  # no frame count, or the header over-counted
            kept, count = decode(None)
            indices = sample_frame_indices(count, num_frames) if count else []
    except GenerateError:
        raise
    except Exception as error:  # PyAV raises its own error types (av.error.*) for unreadable files
        raise GenerateError(
            f"--video {path}: cannot decode it with PyAV ({type(error).__name__}: {error})"
        ) from error
    if not kept:
        raise GenerateError(f"--video {path}: no frames could be decoded")
    return np.stack([kept[i] for i in indices])


def load_video(path: str, num_frames: int) -> tuple[np.ndarray, int]:
    """The clip's ``num_frames`` uniformly sampled frames, uint8 [num_frames, H, W, 3], and its length."""
    import numpy as np
    import torch

    file = existing_file(path, "--video")
    suffix = file.suffix.lower()
    if suffix in CONTAINER_VIDEO_EXTENSIONS:
        frames = _decode_with_av(file, num_frames)
        return frames, -1
    if suffix not in ARRAY_VIDEO_EXTENSIONS:
        raise GenerateError(
            f"--video {path}: unknown file type {file.suffix!r}; use .npy or .pt (uint8 [T, H, W, 3] or "
            f"[T, 3, H, W]), or a video file ({', '.join(CONTAINER_VIDEO_EXTENSIONS)}) with PyAV installed"
        )
    try:
        if suffix == ".npy":
            array = np.load(file, allow_pickle=False)
        else:
            array = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # numpy/torch raise many types for a file that is not theirs
        raise GenerateError(
            f"--video {path}: cannot read it as {suffix} ({type(error).__name__}: {error})"
        ) from error
    clip = _frames_hwc(array, file)
    total = clip.shape[0]
    return clip[sample_frame_indices(total, num_frames)], total


def load_events(
    path: str,
    window: tuple[int, int] | None,
    sensor_size: tuple[int, int] | None,
    *,
    trust_pickle: bool = False,
):
    """An EventStream from a DSEC ``.h5`` or EventGPT ``.npy`` file, cut to ``window`` if given.

    ``trust_pickle`` (``--trust-pickle``) loads an EventGPT ``.npy`` with the full pickle, which may run
    any code the file names; by default only dicts, lists and numpy arrays are built."""
    from crossspec_kernels.events import DSECEventFile, load_eventgpt_npy

    file = existing_file(path, "--events")
    suffix = file.suffix.lower()
    try:
        if suffix in DSEC_EXTENSIONS:
            with DSECEventFile(file, sensor_size or DEFAULT_DSEC_SENSOR_SIZE) as events:
                t0, t1 = window if window is not None else events.time_range
                return events.read(t0, t1), (t0, t1)
        if suffix in EVENTGPT_EXTENSIONS:
            stream = load_eventgpt_npy(file, sensor_size, trust_pickle=trust_pickle)
            if window is not None:
                return stream.slice_time(*window), window
            span = (int(stream.t[0]), int(stream.t[-1]) + 1) if len(stream) else (0, 0)
            return stream, span
    except (ImportError, OSError, ValueError, TypeError, KeyError) as error:
        raise GenerateError(f"--events {path}: {error}") from error
    raise GenerateError(
        f"--events {path}: unknown file type {file.suffix!r}; use a DSEC events file "
        f"({', '.join(DSEC_EXTENSIONS)}) or an EventGPT .npy"
    )


def target_num_frames(target) -> tuple[int, int]:
    """(frames the target reads, video tokens per frame), from its config (the model or its config)."""
    config = getattr(target, "config", target)
    vision = config.vision_config
    per_frame = (vision.image_size // vision.patch_size) ** 2 + 1  # the video tower keeps CLS
    video_tokens = getattr(config, "video_seq_length", None)
    if isinstance(video_tokens, int) and video_tokens > 0 and video_tokens % per_frame == 0:
        return video_tokens // per_frame, per_frame
    return 8, per_frame  # Video-LLaVA's frame count


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GenerateError(f"--target: {path} is not readable JSON ({error})") from error
    if not isinstance(data, dict):
        raise GenerateError(f"--target: {path} must hold a JSON object")
    return data


def _size_pair(value, what: str, path) -> tuple[int, int] | int:
    """A processor size entry: {"height", "width"} -> (h, w); {"shortest_edge"} or an int -> int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    raise GenerateError(f"--target: {path}: unsupported {what} {value!r}")


class BuiltinVideoProcessor:
    """What ``VideoLlavaProcessor(text, videos=...)`` computes, in PyTorch (see the module docstring)."""

    def __init__(self, folder: Path, target, tokenizer) -> None:
        """``target``: the Video-LLaVA model or its config (only the config is read)."""
        from crossspec_kernels.models.eventgpt import CLIP_MEAN, CLIP_STD

        config = getattr(target, "config", target)
        vision = config.vision_config
        settings: dict = {}
        source = None
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):  # the later wins
            if (folder / name).is_file():
                settings.update(_read_json(folder / name))
                source = folder / name
        processor = (
            _read_json(folder / "processor_config.json")
            if (folder / "processor_config.json").is_file()
            else {}
        )
        if isinstance(processor.get("video_processor"), dict):  # transformers 5 nests the sub-configs
            settings.update(processor["video_processor"])
        self.source = str(source) if source is not None else "model config (no processor files)"
        self.do_resize = bool(settings.get("do_resize", True))
        self.size = _size_pair(settings.get("size", {"shortest_edge": vision.image_size}), "size", source)
        self.do_center_crop = bool(settings.get("do_center_crop", True))
        crop = _size_pair(settings.get("crop_size", vision.image_size), "crop_size", source)
        self.crop_size = (crop, crop) if isinstance(crop, int) else crop
        resample = settings.get("resample", 3)
        if resample not in _RESAMPLE_MODES:
            raise GenerateError(f"--target: {source}: unsupported resample {resample!r} (0, 2 or 3)")
        self.mode = _RESAMPLE_MODES[resample]
        self.do_rescale = bool(settings.get("do_rescale", True))
        self.rescale_factor = float(settings.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(settings.get("do_normalize", True))
        self.mean = tuple(settings.get("image_mean", CLIP_MEAN))
        self.std = tuple(settings.get("image_std", CLIP_STD))
        self.patch_size = int(processor.get("patch_size", vision.patch_size))
        self.extra_tokens = int(processor.get("num_additional_image_tokens", 1))
        self.video_token = processor.get("video_token", getattr(tokenizer, "video_token", "<video>"))
        self.tokenizer = tokenizer
        if tokenizer.convert_tokens_to_ids(self.video_token) != config.video_token_index:
            raise GenerateError(
                f"--target: the tokenizer maps {self.video_token!r} to id "
                f"{tokenizer.convert_tokens_to_ids(self.video_token)}, the model expects "
                f"{config.video_token_index} (config.video_token_index)"
            )

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float32 [T, 3, crop_h, crop_w]."""
        import torch

        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        height, width = video.shape[-2:]
        if self.do_resize:
            if isinstance(self.size, tuple):
                new_size = self.size
            else:
                short, long = (height, width) if height <= width else (width, height)
                new_long = int(self.size * long / short)
                new_size = (self.size, new_long) if height <= width else (new_long, self.size)
            if tuple(new_size) != (height, width):
                antialias = self.mode in ("bilinear", "bicubic")
                video = torch.nn.functional.interpolate(
                    video, size=new_size, mode=self.mode, antialias=antialias, align_corners=None
                )
                video = video.round().clamp(0, 255)  # torchvision's uint8 path rounds back to uint8
        if self.do_center_crop:
            crop_h, crop_w = self.crop_size
            height, width = video.shape[-2:]
            if crop_h > height or crop_w > width:
                pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
                video = torch.nn.functional.pad(
                    video, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
                )
                height, width = video.shape[-2:]
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
            video = video[:, :, top : top + crop_h, left : left + crop_w]
        if self.do_rescale:
            video = video * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            video = (video - mean) / std
        return video.contiguous()

    def __call__(self, text: str, frames: np.ndarray) -> dict:
        pixels = self.pixel_values(frames)
        height, width = pixels.shape[-2:]
        per_frame = (height // self.patch_size) * (width // self.patch_size) + self.extra_tokens
        text = text.replace(self.video_token, self.video_token * (per_frame * pixels.shape[0]))
        encoded = self.tokenizer(text, return_tensors="pt")
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "pixel_values_videos": pixels[None],
        }
