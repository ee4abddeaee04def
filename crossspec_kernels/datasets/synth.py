"""A synthetic benchmark dataset: per clip a DSEC events.h5 (or an EventGPT events.npy) and a
frame array, plus a manifest.

    OUT/manifest.jsonl
    OUT/clip_0000/events.h5    DSEC layout (events/x,y,t,p, ms_to_idx, t_offset), read by DSECEventFile
                               (event_format="npy": events.npy, EventGPT's dict {x, y, t, p})
    OUT/clip_0000/video.npy    uint8 [frames, height, width, 3], read by ``crossspec generate --video``
    ...

Each clip is ``synthetic_clip`` (the same scene seen as events and as video) with its own seed, so
the dataset is reproducible; the manifest's window is the whole clip. Only one question has a known
answer (the scene's object count), so only that one carries a reference answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.jsonl"
# Clip i of seed s uses synthetic_clip seed s * _SEED_STRIDE + i: datasets of different seeds share no clip.
_SEED_STRIDE = 1_000_000
_UINT32_US = 2**32  # DSEC stores t as uint32 microseconds
EVENT_FORMATS = ("h5", "npy")  # DSEC h5, EventGPT npy


def _questions(num_objects: int) -> list[tuple[str, str | None]]:
    return [
        ("What is moving in the scene?", None),
        ("How many objects are moving?", str(num_objects)),
        ("Describe the motion you see.", None),
    ]


def check_synth_args(settings: dict, names: dict | None = None) -> None:
    """ValueError naming the argument (``names[argument]`` if given, e.g. the CLI's flag); runs
    before anything is written. ``settings``: write_synthetic_dataset's keyword arguments."""
    limits = {
        "clips": (1, _SEED_STRIDE),
        "frames": (1, 10_000),
        "height": (1, 2**15),  # synthetic_clip's limit; DSEC's uint16 coordinates allow more
        "width": (1, 2**15),
        "duration_us": (1, _UINT32_US - 1),
        "events_per_clip": (1, 2**31 - 1),
        "num_objects": (0, 1_000),
    }
    event_format = settings.get("event_format", "h5")
    if event_format not in EVENT_FORMATS:
        shown = (names or {}).get("event_format", "event_format")
        raise ValueError(f"{shown} must be one of {EVENT_FORMATS}, got {event_format!r}")
    for name, (low, high) in limits.items():
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            shown = (names or {}).get(name, name)
            raise ValueError(f"{shown} must be an int in [{low}, {high}], got {value!r}")


def write_synthetic_dataset(
    out: str | os.PathLike,
    clips: int,
    *,
    seed: int = 0,
    frames: int = 8,
    height: int = 48,
    width: int = 64,
    duration_us: int = 250_000,
    events_per_clip: int = 100_000,
    num_objects: int = 3,
    event_format: str = "h5",
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Write ``clips`` synthetic clips and their manifest under ``out``; returns the manifest's path.

    A non-empty ``out`` is refused unless ``force`` (then files of the same names are overwritten,
    nothing else is removed).
    """
    import numpy as np

    from crossspec_kernels.adapter_tools._progress import progress
    from crossspec_kernels.events import save_eventgpt_npy, synthetic_clip, write_dsec_h5

    check_synth_args(
        dict(
            clips=clips,
            frames=frames,
            height=height,
            width=width,
            duration_us=duration_us,
            events_per_clip=events_per_clip,
            num_objects=num_objects,
            event_format=event_format,
        )
    )
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"write_synthetic_dataset: {str(folder)!r} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise FileExistsError(
            f"write_synthetic_dataset: {str(folder)!r} is not empty (force=True overwrites)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    questions = _questions(num_objects)
    lines = []
    bar = progress(total=clips, desc="synthetic clips", unit="clip", disable=not show_progress)
    for index in range(clips):
        events, video = synthetic_clip(
            num_frames=frames,
            height=height,
            width=width,
            duration_us=duration_us,
            events_per_second=events_per_clip / (duration_us / 1e6),
            seed=seed * _SEED_STRIDE + index,
            num_objects=num_objects,
        )
        name = f"clip_{index:04d}"
        (folder / name).mkdir(exist_ok=True)
        events_file = f"{name}/events.{event_format}"
        if event_format == "h5":
            write_dsec_h5(folder / events_file, events)
        else:
            save_eventgpt_npy(folder / events_file, events)
        np.save(folder / name / "video.npy", video.permute(0, 2, 3, 1).contiguous().numpy())
        question, answer = questions[index % len(questions)]
        record = {
            "id": name,
            "video": f"{name}/video.npy",
            "events": events_file,
            "window_us": [0, duration_us],
            "question": question,
            "sensor_size": [height, width],
        }
        if answer is not None:
            record["answer"] = answer
        lines.append(json.dumps(record))
        bar.update(1)
    bar.close()
    manifest = folder / MANIFEST_NAME
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
