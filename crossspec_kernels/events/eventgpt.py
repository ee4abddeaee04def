"""EventGPT ``.npy`` event files: a dict {'x', 'y', 't', 'p'} of arrays saved with ``np.save``.

``np.save`` stores a dict as a pickled 0-d object array, and a pickle can name any Python callable to
run on load. So these files are read with a restricted unpickler that can build only what such a
file holds (dicts, lists, numpy arrays, dtypes and scalars) and refuses every other global before
calling anything. ``trust_pickle=True`` loads with the full pickle, for trusted files with other
content. Structured arrays with fields x, y, t, p (no pickle at all) are read too.
"""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

import numpy as np

from crossspec_kernels.events.stream import EventStream, as_int64, check_sensor_size

EVENTGPT_KEYS = ("x", "y", "t", "p")


class UnsafePickleError(ValueError):
    """An ``.npy`` file's pickle names a global the restricted loader does not build."""


def _numpy_multiarray():
    # numpy >= 2 keeps the module at numpy._core; files written by numpy 1.x name numpy.core.
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _allowed_globals() -> dict[tuple[str, str], object]:
    multiarray = _numpy_multiarray()
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct  # ndarray.__reduce__
        allowed[(module, "scalar")] = multiarray.scalar  # numpy scalars (np.int64(5) as a value)
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, numbers, strings and numpy arrays; refuses every other global."""

    def __init__(self, file, path: Path) -> None:
        # encoding="latin1" as np.load: Python 2 pickles of numpy arrays hold their bytes as str.
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        found = self._allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"load_eventgpt_npy: {self._path} refers to {module}.{name}, which an EventGPT event file "
                "never needs (only dicts, lists and numpy arrays are loaded); refusing to load it. "
                "If you trust the file, pass trust_pickle=True (crossspec: --trust-pickle)"
            )
        return found


def _read_npy(path: Path, trust_pickle: bool):
    """The array stored in ``path``; object arrays go through the restricted unpickler."""
    header_readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            reader = header_readers.get(version)
            # Unknown header versions cannot hold a pickle np.save wrote; np.load refuses pickles there.
            has_pickle = reader is not None and reader(file)[2].hasobject
            if not has_pickle or trust_pickle:
                file.seek(0)
                return np.load(file, allow_pickle=trust_pickle)
            return _ArrayUnpickler(file, path).load()
    except UnsafePickleError:
        raise
    # numpy and pickle raise these for empty, truncated or foreign files.
    except (ValueError, EOFError, OSError, pickle.UnpicklingError, AttributeError, TypeError) as error:
        raise ValueError(
            f"load_eventgpt_npy: {path} is not a readable .npy file ({type(error).__name__}: {error}); "
            "expected np.save of a dict {'x', 'y', 't', 'p'}"
        ) from error


def _field(data: dict, name: str, path: Path) -> np.ndarray:
    value = data[name]
    if isinstance(value, list):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        found = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"load_eventgpt_npy: {path}: '{name}' must be a numeric array, got {found}")
    if value.ndim != 1:
        raise ValueError(f"load_eventgpt_npy: {path}: '{name}' must be 1-D [n], got shape {value.shape}")
    return value


def load_eventgpt_npy(
    path: str | os.PathLike,
    sensor_size: tuple[int, int] | None = None,
    *,
    clip: str = "error",
    trust_pickle: bool = False,
) -> EventStream:
    """Read an EventGPT event file into an EventStream.

    Args:
        path: a ``.npy`` file holding a dict with keys 'x', 'y', 't' (µs), 'p' (extra keys are ignored),
            or a structured array with those fields.
        sensor_size: (height, width). None infers it from the data as (max y + 1, max x + 1), the
            smallest sensor that holds every event; pass the real size when it matters (the
            rasterised frames' shape depends on it).
        clip: EventStream's handling of coordinates outside ``sensor_size``: "error" or "drop".
        trust_pickle: load the pickle with no restriction (it may run any code): trusted files only.
            False (default) builds only dicts, lists and numpy arrays and raises UnsafePickleError,
            naming the file and the refused global, for anything else.

    Float timestamps are accepted when they are finite whole microseconds (numpy files often store t
    as float64); fractional, non-finite or out-of-int64 ones raise rather than being truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_eventgpt_npy: no such file: {path}")
    data = _read_npy(path, trust_pickle)
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

    x, y, t, p = (_field(data, name, path) for name in EVENTGPT_KEYS)
    t = as_int64(t, "t", f"load_eventgpt_npy: {path}")
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
