"""EventGPT ``.npy`` event files: a dict {'x', 'y', 't', 'p'} of arrays saved with ``np.save``.

``np.save`` stores a dict as a pickled 0-d object array, so loading one runs the pickle: open only
files you trust. Structured arrays with fields x, y, t, p (no pickle) are read too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from crossspec_kernels.events.stream import EventStream, check_sensor_size

EVENTGPT_KEYS = ("x", "y", "t", "p")


def load_eventgpt_npy(
    path: str | os.PathLike, sensor_size: tuple[int, int] | None = None, *, clip: str = "error"
) -> EventStream:
    """Read an EventGPT event file into an EventStream.

    Args:
        path: a ``.npy`` file holding a dict with keys 'x', 'y', 't' (µs), 'p' (extra keys are ignored),
            or a structured array with those fields. Pickled content is executed on load: trusted
            files only.
        sensor_size: (height, width). None infers it from the data as (max y + 1, max x + 1), the
            smallest sensor that holds every event; pass the real size when it matters (the
            rasterised frames' shape depends on it).
        clip: EventStream's handling of coordinates outside ``sensor_size``: "error" or "drop".

    Float timestamps are accepted when they are whole microseconds (numpy files often store t as
    float64); fractional ones raise rather than being truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_eventgpt_npy: no such file: {path}")
    data = np.load(path, allow_pickle=True)
    if isinstance(data, np.ndarray) and data.dtype == object and data.shape == ():
        data = data.item()
    if isinstance(data, np.ndarray) and data.dtype.names is not None:
        fields = set(data.dtype.names)
        data = {name: data[name] for name in EVENTGPT_KEYS if name in fields}
        missing = [name for name in EVENTGPT_KEYS if name not in fields]
    elif isinstance(data, dict):
        missing = [name for name in EVENTGPT_KEYS if name not in data]
    else:
        found = (
            f"an array of shape {data.shape} and dtype {data.dtype}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise ValueError(
            f"load_eventgpt_npy: {path} must hold a dict with keys {list(EVENTGPT_KEYS)} (saved with np.save), "
            f"got {found}"
        )
    if missing:
        raise ValueError(f"load_eventgpt_npy: {path} is missing key(s) {missing} (it has {sorted(data)})")

    x, y, t, p = (np.asarray(data[name]) for name in EVENTGPT_KEYS)
    if t.dtype.kind == "f":
        fractional = t != np.floor(t)
        if bool(np.any(fractional)):
            index = int(np.argmax(fractional))
            raise ValueError(
                f"load_eventgpt_npy: {path}: t must be whole microseconds, got t[{index}] = {float(t[index])}"
            )
        t = t.astype(np.int64)
    if sensor_size is None:
        if x.size == 0:
            raise ValueError(f"load_eventgpt_npy: {path} holds no events; pass sensor_size to load it")
        sensor_size = (int(np.max(y)) + 1, int(np.max(x)) + 1)
    else:
        sensor_size = check_sensor_size(sensor_size, "load_eventgpt_npy")
    try:
        return EventStream(x, y, t, p, sensor_size, clip=clip)
    except (TypeError, ValueError) as error:
        raise type(error)(f"load_eventgpt_npy: {path}: {error}") from error


def save_eventgpt_npy(path: str | os.PathLike, stream: EventStream) -> Path:
    """Save ``stream`` as an EventGPT dict {'x', 'y', 't', 'p'} (p as 0/1 uint8); returns the path written.

    ``np.save`` appends ``.npy`` to a path without that suffix; the returned path says where it went.
    """
    if not isinstance(stream, EventStream):
        raise TypeError(f"save_eventgpt_npy: stream must be an EventStream, got {type(stream).__name__}")
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    events = stream.as_numpy()
    events["p"] = events["p"].astype(np.uint8)
    np.save(path, events, allow_pickle=True)
    return path
