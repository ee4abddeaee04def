"""DSEC ``events.h5`` files: windowed reads that touch only the events they return, and a writer.

Layout (the DSEC dataset's ``events_left/events.h5``, ``events_right/events.h5``):

    events/x, events/y   uint16 [n]  pixel coordinates
    events/t             uint32 [n]  microseconds, non-decreasing, relative to t_offset
    events/p             uint8  [n]  polarity, 1 = brighter
    ms_to_idx            uint64 [m]  ms_to_idx[k] = index of the first event with t >= k * 1000
    t_offset             int64  []   absolute time of t = 0 (optional, 0 when absent)

Real DSEC files compress their datasets with Blosc; reading them needs ``pip install hdf5plugin``,
which is imported here when installed (it registers the filter with h5py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from crossspec_kernels.events.stream import EventStream, as_int64, check_sensor_size

EVENT_DATASETS = ("events/x", "events/y", "events/t", "events/p")
DSEC_SENSOR_SIZE = (480, 640)
_UINT32_LIMIT = 2**32
_UINT16_LIMIT = 2**16
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _import_h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError(
            "DSEC events.h5 files need h5py: pip install h5py (or pip install 'crossspec-kernels[events]')"
        ) from error
    with contextlib.suppress(ImportError):  # optional: registers the Blosc filter DSEC files use
        import hdf5plugin  # noqa: F401
    return h5py


class DSECEventFile:
    """Random access to the events of one DSEC ``events.h5`` file.

    >>> with DSECEventFile("events.h5") as events:
    ...     window = events.read(50_000, 100_000)  # EventStream of the events with 50 ms <= t < 100 ms

    Times are the file's own ``t`` (microseconds since ``t_offset``) unless ``absolute=True``.
    A read costs O(1) index lookups in ``ms_to_idx``, one h5 read of t covering the window plus at
    most a millisecond on each side, and reads of x, y and p over exactly the returned events, so
    memory and time scale with the window, not with the file.
    """

    def __init__(self, path: str | os.PathLike, sensor_size: tuple[int, int] = DSEC_SENSOR_SIZE):
        h5py = _import_h5py()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"DSECEventFile: no such file: {self.path}")
        self.sensor_size = check_sensor_size(sensor_size, "DSECEventFile")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:  # h5py's error for empty, truncated and non-HDF5 files
            raise OSError(
                f"DSECEventFile: {self.path} is not a readable HDF5 file ({error}); expected a DSEC "
                "events.h5 (is it empty, truncated, or another format?)"
            ) from error
        try:
            self._events, self._ms_to_idx, self.t_offset = self._open_datasets(h5py)
        except BaseException:
            self._file.close()
            raise

    def _open_datasets(self, h5py):
        required = (*EVENT_DATASETS, "ms_to_idx")
        missing = [name for name in required if not isinstance(self._file.get(name), h5py.Dataset)]
        if missing:
            raise ValueError(
                f"DSECEventFile: {self.path} is not a DSEC events file: missing dataset(s) {missing} "
                f"(expected {', '.join(required)})"
            )
        events = {name[-1]: self._file[name] for name in EVENT_DATASETS}
        shapes = {name: events[name[-1]].shape for name in EVENT_DATASETS}
        if any(len(shape) != 1 for shape in shapes.values()) or len(set(shapes.values())) != 1:
            raise ValueError(
                f"DSECEventFile: {self.path}: events/* must be 1-D and equally long, got {shapes}"
            )
        kinds = {"x": "iu", "y": "iu", "t": "iuf", "p": "iub"}
        for name, allowed in kinds.items():
            dtype = events[name].dtype
            if dtype.kind not in allowed:
                raise ValueError(
                    f"DSECEventFile: {self.path}: events/{name} must hold numbers (DSEC: "
                    f"{'uint32' if name == 't' else 'uint16' if name in 'xy' else 'uint8'}), got dtype {dtype}"
                )
        ms_to_idx = self._file["ms_to_idx"]
        if ms_to_idx.ndim != 1 or ms_to_idx.shape[0] == 0:
            raise ValueError(
                f"DSECEventFile: {self.path}: ms_to_idx must be 1-D and non-empty, got {ms_to_idx.shape}"
            )
        return events, ms_to_idx, self._read_t_offset(h5py)

    def _read_t_offset(self, h5py) -> int:
        if "t_offset" not in self._file:
            return 0
        dataset = self._file["t_offset"]
        value = np.asarray(dataset[()]) if isinstance(dataset, h5py.Dataset) else None
        if value is None or value.size != 1 or value.dtype.kind not in "iuf":
            found = f"dtype {value.dtype}, shape {value.shape}" if value is not None else "a group"
            raise ValueError(
                f"DSECEventFile: {self.path}: t_offset must be one integer (int64 µs), got {found}"
            )
        return int(as_int64(value.reshape(1), "t_offset", f"DSECEventFile: {self.path}")[0])

    def __enter__(self) -> DSECEventFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return self._events["t"].shape[0]

    def __repr__(self) -> str:
        return f"DSECEventFile({str(self.path)!r}, n={len(self)}, t_offset={self.t_offset})"

    @property
    def time_range(self) -> tuple[int, int]:
        """(first t, last t + 1) in file time: ``read(*time_range)`` returns every event; (0, 0) if empty."""
        self._check_open()
        if len(self) == 0:
            return 0, 0
        times, last = self._events["t"], len(self) - 1
        where = f"DSECEventFile: {self.path}"
        first = int(as_int64(times[0:1], "events/t", where)[0])
        return first, int(as_int64(times[last:], "events/t", where, first_index=last)[0]) + 1

    def read(self, t0_us: int, t1_us: int, *, absolute: bool = False, clip: str = "error") -> EventStream:
        """Events with t0_us <= t < t1_us as an EventStream (int64 t in the same time base as the bounds).

        ``absolute=False``: bounds and returned t are the file's t (relative to t_offset).
        ``absolute=True``: bounds and returned t are absolute (file t + t_offset).
        ``clip`` is EventStream's: "error" or "drop" for coordinates outside ``sensor_size``.
        """
        self._check_open()
        if t1_us < t0_us:
            raise ValueError(f"DSECEventFile.read: t1_us must be >= t0_us, got t0_us={t0_us}, t1_us={t1_us}")
        shift = self.t_offset if absolute else 0
        try:
            start, stop, times = self._locate(int(t0_us) - shift, int(t1_us) - shift)
            x, y, p = (self._events[name][start:stop] for name in "xyp")
        except OSError as error:  # h5py's error for a missing compression filter and for truncated data
            raise OSError(
                f"DSECEventFile: reading {self.path} failed ({error}); the file may be truncated, or "
                "compressed with a filter h5py lacks (DSEC files use Blosc: pip install hdf5plugin)"
            ) from error
        # numpy's int64 addition wraps silently; times are sorted, so the ends bound the sum.
        if times.size and not _INT64_MIN <= int(times[0]) + shift <= int(times[-1]) + shift <= _INT64_MAX:
            raise ValueError(
                f"DSECEventFile: {self.path}: t + t_offset overflows int64 (t in [{int(times[0])}, "
                f"{int(times[-1])}], t_offset={self.t_offset}): the file's t_offset is corrupt"
            )
        try:
            return EventStream(x, y, times + shift, p, self.sensor_size, clip=clip)
        except ValueError as error:
            raise ValueError(f"DSECEventFile: {self.path}, events [{start}, {stop}): {error}") from error

    def _locate(self, t0: int, t1: int) -> tuple[int, int, np.ndarray]:
        """Index range [start, stop) of t0 <= t < t1 (file time) and those events' t as int64."""
        num_events, num_ms = len(self), self._ms_to_idx.shape[0]
        # ms_to_idx brackets the window to whole milliseconds: every event with t >= t0 lies at or
        # after ms_to_idx[floor(t0 / 1000)], every event with t < t1 before ms_to_idx[ceil(t1 / 1000)].
        # Past the table's end the only safe bounds are its last entry and the file's end.
        lo = 0 if t0 <= 0 else int(self._ms_to_idx[min(t0 // 1000, num_ms - 1)])
        ceil_ms = -(-t1 // 1000)
        hi = 0 if t1 <= 0 else (num_events if ceil_ms >= num_ms else int(self._ms_to_idx[ceil_ms]))
        if not 0 <= lo <= hi <= num_events:
            raise ValueError(
                f"DSECEventFile: {self.path}: ms_to_idx gives index range [{lo}, {hi}) for t in "
                f"[{t0}, {t1}), outside [0, {num_events}] or reversed: the file's ms_to_idx is corrupt"
            )
        # One event more on each side lets us check the table instead of trusting it.
        read_lo, read_hi = max(lo - 1, 0), min(hi + 1, num_events)
        where = f"DSECEventFile: {self.path}"
        chunk = as_int64(self._events["t"][read_lo:read_hi], "events/t", where, first_index=read_lo)
        if chunk.size > 1 and bool(np.any(chunk[1:] < chunk[:-1])):
            index = read_lo + int(np.argmax(chunk[1:] < chunk[:-1])) + 1
            raise ValueError(
                f"DSECEventFile: {self.path}: events/t must be non-decreasing, but t[{index}] = "
                f"{chunk[index - read_lo]} < t[{index - 1}] = {chunk[index - 1 - read_lo]}"
            )
        start = read_lo + int(np.searchsorted(chunk, t0, side="left"))
        stop = read_lo + int(np.searchsorted(chunk, t1, side="left"))
        if (lo > 0 and start < lo) or (hi < num_events and stop > hi):
            raise ValueError(
                f"DSECEventFile: {self.path}: ms_to_idx disagrees with events/t around t in [{t0}, {t1}) "
                f"(table bounds [{lo}, {hi}), events at [{start}, {stop})): the file's ms_to_idx is corrupt"
            )
        return start, stop, chunk[start - read_lo : stop - read_lo]

    def _check_open(self) -> None:
        if not self._file:
            raise ValueError(f"DSECEventFile: {self.path} is closed")


def write_dsec_h5(path: str | os.PathLike, stream: EventStream, t_offset: int = 0) -> None:
    """Write ``stream`` as a DSEC events.h5 file, ms_to_idx included.

    ``stream.t`` holds absolute times; the file stores t - t_offset, which must fit uint32
    (0 <= t - t_offset < 2**32, about 71 minutes). Reading it back with ``absolute=True`` returns
    the stream's own timestamps.
    """
    h5py = _import_h5py()
    if not isinstance(stream, EventStream):
        raise TypeError(f"write_dsec_h5: stream must be an EventStream, got {type(stream).__name__}")
    if max(stream.sensor_size) > _UINT16_LIMIT:
        raise ValueError(
            f"write_dsec_h5: DSEC stores uint16 coordinates, got sensor_size {stream.sensor_size}"
        )
    events = stream.as_numpy()
    times = events["t"] - int(t_offset)
    if times.size and (times[0] < 0 or times[-1] >= _UINT32_LIMIT):
        raise ValueError(
            f"write_dsec_h5: t - t_offset must lie in [0, 2**32) (uint32 microseconds), got "
            f"[{times[0]}, {times[-1]}] for t_offset={t_offset}"
        )
    # One entry per millisecond up to the first one with no event at or after it, which is n.
    num_ms = int(times[-1]) // 1000 + 2 if times.size else 1
    ms_to_idx = np.searchsorted(times, np.arange(num_ms, dtype=np.int64) * 1000, side="left")
    with h5py.File(path, "w") as file:
        file.create_dataset("events/x", data=events["x"].astype(np.uint16))
        file.create_dataset("events/y", data=events["y"].astype(np.uint16))
        file.create_dataset("events/t", data=times.astype(np.uint32))
        file.create_dataset("events/p", data=events["p"].astype(np.uint8))
        file.create_dataset("ms_to_idx", data=ms_to_idx.astype(np.uint64))
        file.create_dataset("t_offset", data=np.int64(t_offset))
