"""EventStream: a validated, time-sorted batch of events from one sensor."""

from __future__ import annotations

import warnings
from dataclasses import InitVar, dataclass, field

import numpy as np
import torch

CLIP_MODES = ("error", "drop")

# x/y are stored as int16 when every coordinate fits, halving the memory of long streams.
_INT16_LIMIT = 2**15
_INT64_MAX = 2**63 - 1
# torch has no general uint16/uint32 arithmetic: those are widened before wrapping (uint64 goes
# through as_int64, which checks that every value fits).
_NUMPY_WIDENED = {
    np.dtype(np.uint16): np.dtype(np.int32),
    np.dtype(np.uint32): np.dtype(np.int64),
}


@dataclass(eq=False, repr=False)
class EventStream:
    """Events of one sensor, sorted by time: event i fired at pixel (x[i], y[i]) at t[i] µs.

    Fields (all [n], on one device):
        x, y: int16 (int32 for sensors wider or taller than 32,768) pixel coordinates,
            0 <= x < width, 0 <= y < height.
        t: int64 timestamps in microseconds, non-decreasing.
        p: int8 polarity, 1 = brighter (ON), 0 = darker (OFF).
        sensor_size: (height, width).

    Construction accepts numpy arrays or torch tensors of any integer dtype for x, y and t (uint16
    and uint32 as DSEC stores them included; floats are refused rather than truncated) and
    normalises them. Polarity may be 0/1, -1/1 (mapped -1 -> 0) or bool (True -> 1); a mix of -1
    and 0 is refused as ambiguous. Empty streams are allowed.

    Events outside the sensor raise (count and first example in the message), unless
    ``clip="drop"``: then they are removed, their count is kept in ``num_dropped`` and a warning
    says how many, so nothing disappears silently. Validation reads values to the host (a few
    syncs on CUDA): this is ingestion, not a decode-loop path.
    """

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    p: torch.Tensor
    sensor_size: tuple[int, int]
    clip: InitVar[str] = "error"
    num_dropped: int = field(default=0, init=False)

    def __post_init__(self, clip: str) -> None:
        self.sensor_size = check_sensor_size(self.sensor_size)
        if clip not in CLIP_MODES:
            raise ValueError(f"EventStream: clip must be one of {CLIP_MODES}, got {clip!r}")
        x, y, t, p = (
            _as_1d_tensor(name, value) for name, value in zip("xytp", (self.x, self.y, self.t, self.p))
        )
        _check_lengths_and_devices(x, y, t, p)
        for name, value in (("x", x), ("y", y), ("t", t)):
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise ValueError(f"EventStream: {name} must be an integer array, got {value.dtype}")
        x, y, t = x.to(torch.int32), y.to(torch.int32), t.to(torch.int64)
        p = _normalize_polarity(p)
        _check_sorted(t)

        outside = _outside_sensor(x, y, self.sensor_size)
        if bool(outside.any()):
            count = int(outside.sum())
            if clip == "error":
                raise ValueError(
                    f"EventStream: {count} of {len(t)} events lie outside the sensor (height, width) = "
                    f"{self.sensor_size}; {_first_outside(x, y, outside)}; pass clip='drop' to drop them"
                )
            keep = ~outside
            x, y, t, p = x[keep], y[keep], t[keep], p[keep]
            self.num_dropped = count
            warnings.warn(
                f"EventStream: dropped {count} events outside the sensor (height, width) = {self.sensor_size}",
                stacklevel=3,
            )
        coord_dtype = torch.int16 if max(self.sensor_size) <= _INT16_LIMIT else torch.int32
        self.x, self.y, self.t, self.p = x.to(coord_dtype), y.to(coord_dtype), t, p

    @classmethod
    def _trusted(cls, x, y, t, p, sensor_size, num_dropped: int = 0) -> EventStream:
        """Wrap tensors that already satisfy every invariant (views and copies of a valid stream)."""
        stream = object.__new__(cls)
        stream.x, stream.y, stream.t, stream.p = x, y, t, p
        stream.sensor_size = sensor_size
        stream.num_dropped = num_dropped
        return stream

    def validate(self) -> EventStream:
        """Re-check every invariant of the stored tensors (after editing them in place); returns self."""
        x, y, t, p = self.x, self.y, self.t, self.p
        for name, value in zip("xytp", (x, y, t, p)):
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"EventStream: {name} must be a 1-D [n] tensor, got {shape}")
        _check_lengths_and_devices(x, y, t, p)
        for name, value, allowed in (
            ("x", x, (torch.int16, torch.int32)),
            ("y", y, (torch.int16, torch.int32)),
            ("t", t, (torch.int64,)),
            ("p", p, (torch.int8,)),
        ):
            if value.dtype not in allowed:
                raise ValueError(
                    f"EventStream: {name} must be {' or '.join(map(str, allowed))}, got {value.dtype}"
                )
        bad = (p != 0) & (p != 1)
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(f"EventStream: p must hold 0/1, got p[{index}] = {int(p[index])}")
        _check_sorted(t)
        outside = _outside_sensor(x, y, check_sensor_size(self.sensor_size))
        if bool(outside.any()):
            raise ValueError(
                f"EventStream: {int(outside.sum())} of {len(t)} events lie outside the sensor (height, width) = "
                f"{self.sensor_size}; {_first_outside(x, y, outside)}"
            )
        return self

    def __len__(self) -> int:
        return self.t.shape[0]

    def __repr__(self) -> str:
        span = f"t=[{int(self.t[0])}, {int(self.t[-1])}] us" if len(self) else "empty"
        return f"EventStream(n={len(self)}, sensor_size={self.sensor_size}, {span}, device={self.t.device})"

    @property
    def device(self) -> torch.device:
        return self.t.device

    @property
    def duration_us(self) -> int:
        """Last timestamp minus first (0 for an empty or single-event stream)."""
        return int(self.t[-1] - self.t[0]) if len(self) else 0

    def to(self, device: torch.device | str) -> EventStream:
        """The same events on ``device`` (self when already there)."""
        device = torch.device(device)
        if device == self.t.device:
            return self
        moved = (v.to(device) for v in (self.x, self.y, self.t, self.p))
        return EventStream._trusted(*moved, self.sensor_size, self.num_dropped)

    def slice_time(self, t0_us: int, t1_us: int) -> EventStream:
        """Events with t0_us <= t < t1_us, as views of this stream's tensors (no copy).

        Two binary searches: O(log n). Bounds outside the stream's span give an empty or full slice.
        """
        if t1_us < t0_us:
            raise ValueError(
                f"EventStream.slice_time: t1_us must be >= t0_us, got t0_us={t0_us}, t1_us={t1_us}"
            )
        bounds = torch.tensor([t0_us, t1_us], dtype=torch.int64, device=self.t.device)
        start, stop = torch.searchsorted(self.t, bounds).tolist()
        return self._index_slice(start, stop)

    def _index_slice(self, start: int, stop: int) -> EventStream:
        parts = (v[start:stop] for v in (self.x, self.y, self.t, self.p))
        return EventStream._trusted(*parts, self.sensor_size)

    def as_numpy(self) -> dict[str, np.ndarray]:
        """{'x', 'y', 't', 'p'} as numpy arrays on the host, in the stored dtypes."""
        return {name: getattr(self, name).cpu().numpy() for name in "xytp"}

    def to_frames(self, **kwargs) -> torch.Tensor:
        """Rasterise with ``crossspec_kernels.events_to_frames`` (keywords are forwarded to it)."""
        from crossspec_kernels.ops.events_to_frames import events_to_frames

        return events_to_frames(self.x, self.y, self.t, self.p, sensor_size=self.sensor_size, **kwargs)


def check_sensor_size(sensor_size, where: str = "EventStream") -> tuple[int, int]:
    ok = (
        isinstance(sensor_size, (tuple, list))
        and len(sensor_size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sensor_size)
    )
    if not ok:
        raise ValueError(f"{where}: sensor_size must be (height, width) positive ints, got {sensor_size!r}")
    return int(sensor_size[0]), int(sensor_size[1])


def as_int64(
    values: np.ndarray, name: str = "t", where: str = "EventStream", first_index: int = 0
) -> np.ndarray:
    """Integer or whole-float values (microsecond timestamps, mostly) as int64, refusing what a cast
    would corrupt.

    A plain ``astype(np.int64)`` truncates fractions, turns NaN and values past 2**63 into -2**63 and
    wraps uint64 values above 2**63 - 1 to negative times, all silently. ``first_index`` is the
    position of ``values[0]`` in the whole array, for the messages of chunked reads.
    """
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.floor(values))
        if bool(np.any(bad)):
            index = int(np.argmax(bad))
            raise ValueError(
                f"{where}: {name} must be finite whole microseconds, got {name}[{first_index + index}] = "
                f"{float(values[index])}"
            )
        outside = (values < -(2.0**63)) | (values >= 2.0**63)
    elif values.dtype.kind in "iu":
        wide_unsigned = values.dtype.kind == "u" and values.dtype.itemsize == 8
        outside = values > _INT64_MAX if wide_unsigned else np.zeros(values.shape, dtype=bool)
    else:
        raise ValueError(f"{where}: {name} must be an integer or float array, got dtype {values.dtype}")
    if bool(np.any(outside)):
        index = int(np.argmax(outside))
        raise ValueError(
            f"{where}: {name}[{first_index + index}] = {values[index]} does not fit int64 (|{name}| < 2**63): "
            "the values overflowed or the file is corrupt"
        )
    return values.astype(np.int64)


def _as_1d_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ValueError(f"EventStream: {name} must be a numeric array, got numpy dtype {value.dtype}")
        if value.dtype.kind == "u" and value.dtype.itemsize == 8:
            value = as_int64(value, name)
        # torch.from_numpy needs native byte order and positive strides (h5 and reversed views may lack them).
        dtype = _NUMPY_WIDENED.get(value.dtype, value.dtype).newbyteorder("=")
        value = torch.from_numpy(np.ascontiguousarray(value, dtype=dtype))
    elif not isinstance(value, torch.Tensor):
        raise TypeError(
            f"EventStream: {name} must be a numpy array or torch tensor, got {type(value).__name__}"
        )
    if value.dim() != 1:
        raise ValueError(f"EventStream: {name} must be 1-D [n], got shape {tuple(value.shape)}")
    if value.dtype == torch.uint64:
        value = torch.from_numpy(as_int64(value.cpu().numpy(), name)).to(value.device)
    elif value.dtype in (torch.uint16, torch.uint32):
        value = value.to(torch.int64)
    return value


def _check_lengths_and_devices(x, y, t, p) -> None:
    lengths = {name: len(v) for name, v in zip("xytp", (x, y, t, p))}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"EventStream: x, y, t and p must have the same length, got {lengths}")
    devices = {name: str(v.device) for name, v in zip("xytp", (x, y, t, p))}
    if len(set(devices.values())) != 1:
        raise ValueError(f"EventStream: x, y, t and p must be on one device, got {devices}")


def _normalize_polarity(p: torch.Tensor) -> torch.Tensor:
    if p.dtype == torch.bool:
        return p.to(torch.int8)
    if p.dtype.is_complex:
        raise ValueError(f"EventStream: p must be 0/1, -1/1 or bool, got {p.dtype}")
    negative, zero = p == -1, p == 0
    bad = ~(negative | zero | (p == 1))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"EventStream: p must hold 0/1, -1/1 or bool, got p[{index}] = {p[index].item()}")
    if bool(negative.any()) and bool(zero.any()):
        raise ValueError(
            f"EventStream: p mixes -1 (first at p[{int(negative.nonzero()[0, 0])}]) and 0 "
            f"(first at p[{int(zero.nonzero()[0, 0])}]); use 0/1 or -1/1, not both"
        )
    return (p > 0).to(torch.int8)


def _check_sorted(t: torch.Tensor) -> None:
    decreasing = t[1:] < t[:-1]
    if bool(decreasing.any()):
        index = int(decreasing.nonzero()[0, 0]) + 1
        raise ValueError(
            f"EventStream: t must be sorted non-decreasing, but t[{index}] = {int(t[index])} < "
            f"t[{index - 1}] = {int(t[index - 1])}"
        )


def _outside_sensor(x: torch.Tensor, y: torch.Tensor, sensor_size: tuple[int, int]) -> torch.Tensor:
    height, width = sensor_size
    return (x < 0) | (x >= width) | (y < 0) | (y >= height)


def _first_outside(x: torch.Tensor, y: torch.Tensor, outside: torch.Tensor) -> str:
    index = int(outside.nonzero()[0, 0])
    return f"first at index {index}: (x, y) = ({int(x[index])}, {int(y[index])})"
