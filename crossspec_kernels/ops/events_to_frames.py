"""Event rasterization (events -> frames / histogram / voxel grid): validation and backend dispatch.

Backends: ``cuda`` (csrc/events_to_frames.cu via crossspec_kernels._C), ``triton``
(crossspec_kernels/triton/events_to_frames.py) and ``reference`` (crossspec_kernels/reference.py,
the spec). All three are deterministic: the GPU kernels only use integer atomics (bit flags,
counts, int64 fixed point), so repeated runs give bit-identical outputs.

``crossspec::events_to_frames`` is the op as a ``torch.library`` custom op with a fake
implementation: eager calls run the backend directly, torch.compile goes through the custom op.
"""

from __future__ import annotations

import torch

from crossspec_kernels import reference
from crossspec_kernels.ops._dispatch import pick_backend
from crossspec_kernels.reference import EVENT_REPRESENTATIONS, VOXEL_FIXED_POINT_BITS

_COORD_DTYPES = (torch.int16, torch.int32, torch.int64)
_POLARITY_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
MAX_SENSOR_SIDE = 65535
MAX_SLICES = 4096  # num_frames / num_bins
# Integer dtype codes of the CUDA extension (csrc/events_to_frames.cuh, IntDType); bool is uint8.
_INT_CODES = {torch.int8: 0, torch.uint8: 1, torch.bool: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}
_REPRESENTATION_CODES = {"eventgpt": 0, "histogram": 1, "voxel": 2}


def events_to_frames(
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    p: torch.Tensor,
    *,
    sensor_size: tuple[int, int],
    representation: str = "eventgpt",
    num_frames: int = 5,
    num_bins: int = 5,
    normalize: bool = False,
    check: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Rasterize an event stream into the drafter's input representation.

    Args:
        x, y: [n] int16/int32/int64 pixel coordinates, 0 <= x < W, 0 <= y < H.
        t: [n] int64 timestamps (µs), sorted non-decreasing.
        p: [n] polarity, bool or integer; p > 0 is positive, anything else negative.
        sensor_size: (height, width), each in [1, 65535].
        representation:
            "eventgpt": uint8 [num_frames, 3, H, W]. The events are split into num_frames equal-count
                chunks (chunk i = events [i*n // F, (i+1)*n // F)); each chunk is drawn on white, a
                pixel with any positive event in the chunk red (255, 0, 0), else a pixel with any
                negative event blue (0, 0, 255). Empty chunks are white. Resizing to the vision
                tower's input is the drafter's preprocessing, not part of this op.
            "histogram": int32 [2, H, W]: channel 0 counts negative events per pixel, channel 1
                positive ones.
            "voxel": float32 [num_bins, H, W], DSEC's VoxelGrid: t_norm = (B - 1)(t - t[0]) /
                (t[-1] - t[0]) (0 for all when t[-1] == t[0]); an event adds +-1 * (1 - frac) to
                bin floor(t_norm) and +-1 * frac to the next bin if it exists.
        num_frames: eventgpt chunks, in [1, 4096].
        num_bins: voxel bins, in [1, 4096].
        normalize: voxel only, DSEC's normalization: the nonzero entries become (v - mean) / std
            over the nonzero entries (unbiased std). Left unchanged when fewer than two entries are
            nonzero or std == 0 (DSEC would subtract the mean there, zeroing the grid).
        check: values are always checked on CPU tensors (free there): coordinates in range (the
            error gives the count of bad events) and t sorted. On CUDA tensors check=True runs the
            same checks at the cost of one host sync; pass check=False on hot paths. Unchecked, the
            GPU kernels still never write out of bounds: events outside the sensor are skipped and
            voxel bins outside [0, num_bins) (possible only with unsorted t) are dropped.
        backend: "cuda", "triton" or "reference"; None picks cuda (else triton) for CUDA tensors,
            the reference for CPU tensors (triton under TRITON_INTERPRET=1).

    Determinism and voxel tolerance: the GPU backends accumulate voxel weights in int64 fixed point,
    units of 2**-24: an event's two weights are round(frac * 2**24) and 2**24 minus that, so their
    sum is exact, and the grid is converted to float32 once. Each cell is within
    (events at that pixel) * 2**-25 + 2**-24 * |value| of the fp64 reference, and identical from run
    to run and between the cuda and triton backends. eventgpt and histogram are exact.
    With normalize=True the statistics are plain PyTorch fp64 reductions (deterministic, no sync).
    """
    _check_arguments(x, y, t, p, sensor_size, representation, num_frames, num_bins, normalize, check)
    height, width = sensor_size
    num_slices = num_frames if representation == "eventgpt" else num_bins
    device = x.device
    backend = pick_backend("events_to_frames", backend, device, torch.int64)

    if x.dtype != y.dtype:  # the kernels read both coordinates with one type
        x, y = x.to(torch.int64), y.to(torch.int64)
    x, y, t, p = (v.contiguous() for v in (x, y, t, p))
    if torch.compiler.is_compiling():  # no value is read while tracing, whatever ``check`` says
        return torch.ops.crossspec.events_to_frames(
            x, y, t, p, height, width, representation, num_slices, normalize, backend
        )
    if device.type == "cpu" or check:
        _check_values(x, y, t, height, width)
    return _run_backend(x, y, t, p, height, width, representation, num_slices, normalize, backend)


def _run_backend(
    x, y, t, p, height: int, width: int, representation: str, num_slices: int, normalize: bool, backend: str
):
    if backend == "reference":
        return reference.events_to_frames(
            x, y, t, p, sensor_size=(height, width), representation=representation,
            num_frames=num_slices, num_bins=num_slices, normalize=normalize,
        )  # fmt: skip
    if backend == "triton":
        from crossspec_kernels.triton.events_to_frames import events_to_frames as triton_events_to_frames

        out = triton_events_to_frames(
            x, y, t, p, height=height, width=width, representation=representation, num_slices=num_slices
        )
    else:
        out = _cuda_events_to_frames(x, y, t, p, height, width, representation, num_slices)
    if normalize:
        out = normalize_voxel_grid(out)
    return out


@torch.library.custom_op("crossspec::events_to_frames", mutates_args=())
def _events_to_frames_op(
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    p: torch.Tensor,
    height: int,
    width: int,
    representation: str,
    num_slices: int,
    normalize: bool,
    backend: str,
) -> torch.Tensor:
    """crossspec::events_to_frames: the op on checked inputs (torch.compile calls it)."""
    return _run_backend(x, y, t, p, height, width, representation, num_slices, normalize, backend)


@_events_to_frames_op.register_fake
def _(x, y, t, p, height, width, representation, num_slices, normalize, backend):
    shape, dtype = {
        "eventgpt": ((num_slices, 3, height, width), torch.uint8),
        "histogram": ((2, height, width), torch.int32),
        "voxel": ((num_slices, height, width), torch.float32),
    }[representation]
    return x.new_empty(shape, dtype=dtype)


def normalize_voxel_grid(grid: torch.Tensor) -> torch.Tensor:
    """DSEC normalization of a float32 voxel grid on any device, without a host sync: fp64 mean and
    unbiased std over the nonzero entries; unchanged when fewer than two are nonzero or std == 0."""
    values = grid.double()
    nonzero = values != 0
    count = nonzero.sum()
    mean = values.sum() / count  # zeros add nothing to the sum
    variance = torch.where(nonzero, (values - mean) ** 2, 0.0).sum() / (count - 1)
    std = variance.sqrt()
    apply = nonzero & (count > 1) & (std > 0)  # NaN/inf statistics compare False
    return torch.where(apply, (values - mean) / std, values).to(torch.float32)


def _check_arguments(x, y, t, p, sensor_size, representation, num_frames, num_bins, normalize, check) -> None:
    """Shapes, dtypes, devices and options; no value is read here (no host sync)."""
    tensors = {"x": x, "y": y, "t": t, "p": p}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"events_to_frames: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 1:
            raise ValueError(f"events_to_frames: {name} must be 1-D [n], got shape {tuple(value.shape)}")
    num_events = x.shape[0]
    for name, value in tensors.items():
        if value.shape[0] != num_events:
            raise ValueError(
                f"events_to_frames: x, y, t and p must have the same length n, got {name} of length "
                f"{value.shape[0]} and x of length {num_events}"
            )
        if value.device != x.device:
            raise ValueError(f"events_to_frames: {name} is on {value.device} but x is on {x.device}")
    for name in ("x", "y"):
        if tensors[name].dtype not in _COORD_DTYPES:
            raise ValueError(
                f"events_to_frames: {name} must be int16, int32 or int64, got {tensors[name].dtype}"
            )
    if t.dtype != torch.int64:
        raise ValueError(f"events_to_frames: t must be int64 (microseconds), got {t.dtype}")
    if p.dtype not in _POLARITY_DTYPES:
        raise ValueError(
            f"events_to_frames: p must be bool or an integer dtype (p > 0 = positive), got {p.dtype}"
        )

    if (
        not isinstance(sensor_size, (tuple, list))
        or len(sensor_size) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in sensor_size)
    ):
        raise ValueError(
            f"events_to_frames: sensor_size must be a (height, width) pair of ints, got {sensor_size!r}"
        )
    if not all(1 <= side <= MAX_SENSOR_SIDE for side in sensor_size):
        raise ValueError(
            f"events_to_frames: sensor_size (height, width) must be in [1, {MAX_SENSOR_SIDE}] each, "
            f"got {tuple(sensor_size)}"
        )
    if representation not in EVENT_REPRESENTATIONS:
        raise ValueError(
            f"events_to_frames: representation must be one of {EVENT_REPRESENTATIONS}, got {representation!r}"
        )
    for name, value in (("num_frames", num_frames), ("num_bins", num_bins)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SLICES:
            raise ValueError(f"events_to_frames: {name} must be an int in [1, {MAX_SLICES}], got {value!r}")
    if not isinstance(normalize, bool):
        raise ValueError(f"events_to_frames: normalize must be a bool, got {normalize!r}")
    if normalize and representation != "voxel":
        raise ValueError(
            f"events_to_frames: normalize=True applies to representation='voxel' only, got {representation!r}"
        )
    if not isinstance(check, bool):
        raise ValueError(f"events_to_frames: check must be a bool, got {check!r}")


def _check_values(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, height: int, width: int) -> None:
    """Coordinates in range and t sorted: one host read for all counts."""
    if x.numel() == 0:
        return
    counts = torch.stack(
        [
            ((x < 0) | (x >= width)).sum(),
            ((y < 0) | (y >= height)).sum(),
            (t[1:] < t[:-1]).sum(),
        ]
    )
    bad_x, bad_y, unsorted = counts.tolist()
    if bad_x:
        raise ValueError(
            f"events_to_frames: {bad_x} of {x.numel()} events have x outside [0, W = {width}) "
            f"(min {int(x.min())}, max {int(x.max())})"
        )
    if bad_y:
        raise ValueError(
            f"events_to_frames: {bad_y} of {y.numel()} events have y outside [0, H = {height}) "
            f"(min {int(y.min())}, max {int(y.max())})"
        )
    if unsorted:
        raise ValueError(
            f"events_to_frames: t must be sorted non-decreasing, got {unsorted} decreasing steps"
        )


def _cuda_events_to_frames(x, y, t, p, height: int, width: int, representation: str, num_slices: int):
    from crossspec_kernels._ext import get_module

    device = x.device
    cells = num_slices * height * width
    if representation == "eventgpt":
        out = torch.empty((num_slices, 3, height, width), dtype=torch.uint8, device=device)
        workspace = torch.empty((cells + 15) // 16, dtype=torch.int32, device=device)  # 2-bit flags
    elif representation == "histogram":
        out = torch.empty((2, height, width), dtype=torch.int32, device=device)
        workspace = None
    else:
        out = torch.empty((num_slices, height, width), dtype=torch.float32, device=device)
        workspace = torch.empty(cells, dtype=torch.int64, device=device)  # fixed-point sums
    with torch.cuda.device(device):
        get_module().events_to_frames(
            representation=_REPRESENTATION_CODES[representation],
            x=x.data_ptr(),
            y=y.data_ptr(),
            coord_dtype=_INT_CODES[x.dtype],
            t=t.data_ptr(),
            p=p.data_ptr(),
            polarity_dtype=_INT_CODES[p.dtype],
            num_events=x.numel(),
            height=height,
            width=width,
            num_slices=num_slices,
            fixed_point_bits=VOXEL_FIXED_POINT_BITS,
            workspace=0 if workspace is None else workspace.data_ptr(),
            output=out.data_ptr(),
            stream=torch.cuda.current_stream(device).cuda_stream,
        )
    return out
