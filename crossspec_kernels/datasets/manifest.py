"""Benchmark manifests: one JSON object per line, one sample (clip, events, question) per object.

    {"id": "clip_0000", "video": "clip_0000/video.npy", "events": "clip_0000/events.h5",
     "window_us": [0, 250000], "question": "What is moving?", "answer": "3", "sensor_size": [48, 64]}

Fields: ``video`` (required) a frame array (.npy/.pt, uint8 [T, H, W, 3] or [T, 3, H, W]) or a video
container; ``events`` (required) a DSEC ``.h5`` or an EventGPT ``.npy``; ``question`` (required) a
non-empty string; ``window_us`` (optional, default: the whole recording) [t0, t1) in the recording's
own time base, overlapping the recording's events; ``answer`` (optional) a reference answer; ``id`` (optional,
default ``line<N>``) unique; ``sensor_size`` (optional) the event sensor's [height, width] (DSEC
default 480x640, inferred for .npy). Relative paths are resolved against the manifest's folder.
Blank lines are skipped; any other field is an error.

:func:`load_manifest` checks every line, and opens every event file to check its window, before a
model is loaded; an error names the line and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from crossspec_kernels.generate_inputs import (
    ARRAY_VIDEO_EXTENSIONS,
    CONTAINER_VIDEO_EXTENSIONS,
    DEFAULT_DSEC_SENSOR_SIZE,
    DSEC_EXTENSIONS,
    EVENTGPT_EXTENSIONS,
)

REQUIRED_FIELDS = ("video", "events", "question")
OPTIONAL_FIELDS = ("id", "window_us", "answer", "sensor_size")


class ManifestError(ValueError):
    """A bad manifest; the message names the file, the line and the field."""


@dataclass(frozen=True)
class ManifestSample:
    line: int  # 1-based line number in the manifest
    id: str
    video: Path
    events: Path
    window_us: tuple[int, int] | None  # None: the whole recording
    question: str
    answer: str | None
    sensor_size: tuple[int, int] | None


def load_manifest(path: str | os.PathLike, *, check_events: bool = True) -> list[ManifestSample]:
    """Every sample of a manifest, checked; :class:`ManifestError` on the first bad line.

    ``check_events`` opens each event file to check that it reads and that ``window_us`` lies inside
    the recording (needs h5py for DSEC files); without it only paths and types are checked.
    """
    manifest = Path(path)
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{manifest}: cannot read the manifest ({error})") from error
    samples, seen = [], {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        sample = _parse_line(manifest, number, text)
        if sample.id in seen:
            raise ManifestError(
                f"{manifest}:{number}: field 'id': {sample.id!r} is already used on line {seen[sample.id]}"
            )
        seen[sample.id] = number
        if check_events:
            _check_recording(manifest, sample)
        samples.append(sample)
    if not samples:
        raise ManifestError(f"{manifest}: the manifest is empty (no JSON object on any line)")
    return samples


def _parse_line(manifest: Path, number: int, text: str) -> ManifestSample:
    where = f"{manifest}:{number}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ManifestError(
            f"{where}: field {unknown[0]!r}: unknown field (known: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})"
        )
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise ManifestError(f"{where}: field {name!r}: missing (required: {', '.join(REQUIRED_FIELDS)})")

    def field_error(name: str, message: str) -> ManifestError:
        return ManifestError(f"{where}: field {name!r}: {message}")

    def text_field(name: str) -> str:
        value = record[name]
        if not isinstance(value, str) or not value.strip():
            raise field_error(name, f"must be a non-empty string, got {value!r}")
        return value

    def file_field(name: str, suffixes: tuple[str, ...]) -> Path:
        file = manifest.parent / text_field(name)
        if not file.is_file():
            raise field_error(name, f"no such file: {file}")
        if file.suffix.lower() not in suffixes:
            raise field_error(
                name, f"unknown file type {file.suffix!r} (expected one of {', '.join(suffixes)})"
            )
        return file

    def int_pair(name: str) -> tuple[int, int] | None:
        value = record.get(name)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(item, int) and not isinstance(item, bool) for item in value)
        ):
            raise field_error(name, f"must be a list of two ints, got {value!r}")
        return value[0], value[1]

    window = int_pair("window_us")
    if window is not None and not 0 <= window[0] < window[1]:
        raise field_error("window_us", f"must satisfy 0 <= t0 < t1, got {list(window)}")
    sensor = int_pair("sensor_size")
    if sensor is not None and min(sensor) < 1:
        raise field_error("sensor_size", f"must be two positive ints [height, width], got {list(sensor)}")
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise field_error("answer", f"must be a string, got {answer!r}")
    return ManifestSample(
        line=number,
        id=text_field("id") if "id" in record else f"line{number}",
        video=file_field("video", ARRAY_VIDEO_EXTENSIONS + CONTAINER_VIDEO_EXTENSIONS),
        events=file_field("events", DSEC_EXTENSIONS + EVENTGPT_EXTENSIONS),
        window_us=window,
        question=text_field("question"),
        answer=answer,
        sensor_size=sensor,
    )


def recording_span(sample: ManifestSample) -> tuple[int, int]:
    """(first t, last t + 1) of the sample's event file, in the file's own time base."""
    from crossspec_kernels.events import DSECEventFile, load_eventgpt_npy

    if sample.events.suffix.lower() in DSEC_EXTENSIONS:
        with DSECEventFile(sample.events, sample.sensor_size or DEFAULT_DSEC_SENSOR_SIZE) as events:
            return events.time_range
    stream = load_eventgpt_npy(sample.events, sample.sensor_size)
    return (int(stream.t[0]), int(stream.t[-1]) + 1) if len(stream) else (0, 0)


def _check_recording(manifest: Path, sample: ManifestSample) -> None:
    where = f"{manifest}:{sample.line}"
    try:
        first, end = recording_span(sample)
    except (ImportError, OSError, ValueError, TypeError, KeyError) as error:
        raise ManifestError(f"{where}: field 'events': {sample.events}: {error}") from error
    if first == end:
        raise ManifestError(f"{where}: field 'events': {sample.events} holds no events")
    # Overlap, not containment: a window may start before the first event (DSEC windows from 0 do).
    if sample.window_us is not None and not (sample.window_us[0] < end and sample.window_us[1] > first):
        raise ManifestError(
            f"{where}: field 'window_us': {list(sample.window_us)} is outside the recording, whose events "
            f"span [{first}, {end}) µs"
        )
