"""Benchmark of event rasterization, ``crossspec_kernels.events_to_frames``, against vectorised NumPy
(and tonic when it is installed), measured in the same run.

Two ways to run it, from the repository root:

    python bench/bench_events.py [--out results.json] [--quick]   # table + JSON
    pytest bench/bench_events.py                                 # pytest-benchmark

Shapes: synthetic DSEC-like streams (sensor 480x640, x/y int16, p uint8 0/1, t int64 µs sorted over a
50 ms window, pixels uniform) of 1M and 10M events (--quick: 1M), rasterized into 5 EventGPT frames,
the 2-channel polarity histogram and a 5-bin voxel grid.

Bytes: the inputs read once (x, y, p, and t for the voxel grid: 5 or 13 bytes per event) plus the
output written once (and, for EventGPT and voxel, the integer workspace zeroed, written and read).
GB/s and "% HBM" are those bytes over the measured time, so they show how far the op is from the
memory bound; the random scatter makes atomics, not bandwidth, the real limit.

Baselines (same inputs, same run, on the host): ``numpy`` = a straightforward vectorised NumPy
implementation (boolean masks and fancy-index assignment per EventGPT chunk, np.bincount for the
histogram and, with weights, for the voxel grid: the fastest of np.add.at / bincount), and
``tonic`` (tonic.functional's to_frame_numpy / to_voxel_grid_numpy; its conventions differ from
ours, so only its time is reported) when tonic is importable. Every backend, NumPy included, is
checked against the reference before it is timed. Ours run with check=False in the timed region
(the value checks are one host sync; they run once, untimed, with check=True).

Goal on an H100: 1M events -> 5 EventGPT frames in <= 1 ms and >= 50x NumPy.

Without a CUDA device this runs a smoke mode (a small sensor and a few thousand events, reference
backend + NumPy baseline, a few iterations) that proves the script works and claims nothing about
speed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from collections.abc import Callable

import _common as harness
import numpy as np
import pytest
import torch

from crossspec_kernels import events_to_frames, reference
from crossspec_kernels.reference import VOXEL_FIXED_POINT_BITS

OP = "events_to_frames"
SENSOR = (480, 640)  # DSEC (height, width)
SMOKE_SENSOR = (37, 53)
SLICES = 5  # EventGPT frames / voxel bins
WINDOW_US = 50_000  # DSEC's 50 ms windows
REPRESENTATIONS = ("eventgpt", "histogram", "voxel")
OUR_BACKENDS = ("cuda", "triton", "reference")
BASELINES = ("numpy", "tonic")


@dataclasses.dataclass(frozen=True)
class Config:
    representation: str
    num_events: int
    height: int
    width: int

    @property
    def bytes_moved(self) -> int:
        per_event = 2 + 2 + 1 + (8 if self.representation == "voxel" else 0)
        pixels = self.height * self.width
        if self.representation == "eventgpt":
            output = SLICES * 3 * pixels + 3 * SLICES * pixels // 4  # RGB + 2-bit flags x3 passes
        elif self.representation == "histogram":
            output = 2 * pixels * 4
        else:
            output = SLICES * pixels * 4 + 3 * SLICES * pixels * 8  # fp32 + int64 zero/atomics/read
        return self.num_events * per_event + output

    def __str__(self) -> str:
        count = f"{self.num_events // 10**6}M" if self.num_events >= 10**6 else str(self.num_events)
        return f"{self.representation}-n{count}-{self.height}x{self.width}"


def configs(*, smoke: bool, quick: bool) -> list[Config]:
    if smoke:
        sizes, (height, width) = ((3001,) if quick else (0, 3001)), SMOKE_SENSOR
    else:
        sizes, (height, width) = ((10**6,) if quick else (10**6, 10**7)), SENSOR
    return [Config(rep, n, height, width) for n in sizes for rep in REPRESENTATIONS]


@functools.cache
def host_events(num_events: int, height: int, width: int) -> dict:
    """Synthetic DSEC-like stream on the host (torch tensors and the same data as NumPy arrays)."""
    generator = torch.Generator().manual_seed(0)
    events = dict(
        x=torch.randint(0, width, (num_events,), generator=generator, dtype=torch.int16),
        y=torch.randint(0, height, (num_events,), generator=generator, dtype=torch.int16),
        t=torch.randint(0, WINDOW_US, (num_events,), generator=generator).sort().values,
        p=torch.randint(0, 2, (num_events,), generator=generator, dtype=torch.uint8),
    )
    return {**events, "numpy": {name: value.numpy() for name, value in events.items()}}


def make_inputs(config: Config, device: torch.device) -> dict:
    events = host_events(config.num_events, config.height, config.width)
    return {**{k: events[k].to(device) for k in "xytp"}, "numpy": events["numpy"]}


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def numpy_eventgpt(x, y, p, height: int, width: int, num_frames: int) -> np.ndarray:
    frames = np.full((num_frames, 3, height, width), 255, dtype=np.uint8)
    for frame, (start, end) in enumerate(reference.eventgpt_chunk_bounds(len(x), num_frames)):
        xs, ys, positive = x[start:end], y[start:end], p[start:end] > 0
        image = frames[frame]
        image[:, ys[~positive], xs[~positive]] = np.array([0, 0, 255], dtype=np.uint8)[:, None]
        image[:, ys[positive], xs[positive]] = np.array([255, 0, 0], dtype=np.uint8)[:, None]  # red wins
    return frames


def numpy_histogram(x, y, p, height: int, width: int) -> np.ndarray:
    index = ((p > 0).astype(np.int64) * height + y) * width + x
    return np.bincount(index, minlength=2 * height * width).astype(np.int32).reshape(2, height, width)


def numpy_voxel(x, y, t, p, height: int, width: int, num_bins: int) -> np.ndarray:
    cells = num_bins * height * width
    if len(t) == 0:
        return np.zeros((num_bins, height, width), dtype=np.float32)
    span = float(t[-1] - t[0])
    t_norm = (num_bins - 1) * (t - t[0]).astype(np.float64) / span if span > 0 else np.zeros(len(t))
    lower = np.floor(t_norm).astype(np.int64)
    frac = t_norm - lower
    value = np.where(p > 0, 1.0, -1.0)
    pixel = y.astype(np.int64) * width + x
    grid = np.bincount(lower * height * width + pixel, weights=value * (1 - frac), minlength=cells)
    upper = lower + 1 < num_bins
    grid += np.bincount(
        ((lower + 1) * height * width + pixel)[upper], weights=(value * frac)[upper], minlength=cells
    )
    return grid.astype(np.float32).reshape(num_bins, height, width)


def numpy_baseline(config: Config, events: dict) -> np.ndarray:
    x, y, t, p = (events[k] for k in "xytp")
    height, width = config.height, config.width
    if config.representation == "eventgpt":
        return numpy_eventgpt(x, y, p, height, width, SLICES)
    if config.representation == "histogram":
        return numpy_histogram(x, y, p, height, width)
    return numpy_voxel(x, y, t, p, height, width, SLICES)


def tonic_available() -> bool:
    return importlib.util.find_spec("tonic") is not None


@functools.cache
def _tonic_events(num_events: int, height: int, width: int) -> np.ndarray:
    events = host_events(num_events, height, width)["numpy"]
    dtype = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int8)])
    structured = np.empty(num_events, dtype=dtype)
    for name in "xytp":
        structured[name] = events[name]
    return structured


def tonic_baseline(config: Config):
    from tonic import functional

    events = _tonic_events(config.num_events, config.height, config.width)
    sensor = (config.width, config.height, 2)  # tonic's (W, H, polarities)
    if config.representation == "eventgpt":  # per-polarity counts in 5 equal-count slices
        return functional.to_frame_numpy(events, sensor, n_event_bins=SLICES)
    if config.representation == "histogram":
        return functional.to_frame_numpy(events, sensor, n_event_bins=1)
    return functional.to_voxel_grid_numpy(events, sensor, n_time_bins=SLICES)


# ----------------------------------------------------------------------------------------------
# Backends, checks
# ----------------------------------------------------------------------------------------------


def backends_for(device: torch.device, smoke: bool = False) -> tuple[list[str], list[str]]:
    """(backends to time, notes on those left out)."""
    if device.type != "cuda":
        chosen, notes = ["reference"], ["cuda, triton: no CUDA device (the smoke test times the reference)"]
    else:
        chosen, notes = harness.kernel_backends()
        notes.insert(0, harness.ORACLE_NOTE)
    chosen.append("numpy")
    if tonic_available():
        chosen.append("tonic")
    else:
        notes.append("tonic: not installed (pip install tonic)")
    return chosen, notes


def ours(backend: str, config: Config, inputs: dict, *, check: bool) -> torch.Tensor:
    return events_to_frames(
        inputs["x"], inputs["y"], inputs["t"], inputs["p"], sensor_size=(config.height, config.width),
        representation=config.representation, num_frames=SLICES, num_bins=SLICES, check=check,
        backend=backend,
    )  # fmt: skip


def op_callable(backend: str, config: Config, inputs: dict) -> Callable[[], object]:
    if backend == "numpy":
        return lambda: numpy_baseline(config, inputs["numpy"])
    if backend == "tonic":
        return lambda: tonic_baseline(config)
    return lambda: ours(backend, config, inputs, check=False)


@functools.cache
def _reference(config: Config) -> torch.Tensor:
    return ours("reference", config, make_inputs(config, torch.device("cpu")), check=True)


def compare(config: Config, got: torch.Tensor) -> list[str]:
    """Exact for eventgpt/histogram; the documented fixed-point bound for voxel."""
    expected = _reference(config)
    got = got.cpu()
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return [
            f"shape/dtype {tuple(got.shape)} {got.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
        ]
    if config.representation != "voxel":
        return [] if torch.equal(got, expected) else [f"{int((got != expected).sum())} values differ"]
    events = host_events(config.num_events, config.height, config.width)
    per_pixel = torch.bincount(
        events["y"].long() * config.width + events["x"].long(), minlength=config.height * config.width
    ).view(1, config.height, config.width)
    bound = per_pixel * 2.0 ** -(VOXEL_FIXED_POINT_BITS + 1) + 2.0**-23 * expected.double().abs() + 1e-30
    error = (got.double() - expected.double()).abs()
    return [] if bool((error <= bound).all()) else [f"voxel error {float(error.max()):.3g} above the bound"]


def run_checked(backend: str, config: Config, inputs: dict) -> list[str]:
    """One untimed call (full value checks for ours), compared with the reference; also warms up."""
    if backend == "tonic":
        out = tonic_baseline(config)  # other conventions: only its time is comparable
        return [] if out is not None else ["tonic returned nothing"]
    if backend == "numpy":
        return compare(config, torch.from_numpy(numpy_baseline(config, inputs["numpy"])))
    out = ours(backend, config, inputs, check=True)
    harness.synchronize(inputs["x"].device)
    return compare(config, out)


def benchmark_config(config: Config, device, info, backends: list[str], *, quick: bool):
    inputs = make_inputs(config, device)

    def prepare(backend):
        return op_callable(backend, config, inputs), {}, run_checked(backend, config, inputs)

    fields = dict(
        representation=config.representation,
        num_events=config.num_events,
        sensor=f"{config.height}x{config.width}",
    )
    rows, problems = harness.measure_backends(
        config, backends, prepare, device=device, info=info, quick=quick, num_bytes=config.bytes_moved,
        fields=fields, optional=("tonic",),  # an optional baseline's API drift is not our problem
        host_timed=BASELINES,  # host code: wall clock, whatever the device
    )  # fmt: skip
    harness.add_speedups(rows, ("numpy",))
    return rows, problems


TABLE_COLUMNS = harness.op_columns(("speedup_vs_numpy", "x numpy", ".1f"), ("checks", "checks", ""))


def main(argv=None) -> int:
    parser = harness.script_arg_parser(OP, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the CPU smoke test's tiny shapes (same as --cpu)"
    )
    args = parser.parse_args(argv)
    args.cpu = args.cpu or args.smoke
    return harness.run_op_benchmark(
        OP,
        args,
        backends_for,
        configs,
        benchmark_config,
        TABLE_COLUMNS,
        bytes_formula=(
            "n*(2+2+1 [+8 for t in voxel]) input bytes + output bytes; eventgpt adds 3x the 2-bit flags "
            "(zero, atomics, read), voxel 3x the int64 fixed-point workspace"
        ),
        inputs=(
            f"synthetic DSEC-like events: x, y int16 uniform over {SENSOR[0]}x{SENSOR[1]}, p uint8 0/1, t int64 "
            f"sorted uniform over {WINDOW_US} us, torch seed 0; {SLICES} frames / bins"
        ),
        goal="H100: 1M events -> 5 EventGPT frames <= 1 ms and >= 50x numpy",
    )


# ----------------------------------------------------------------------------------------------
# pytest-benchmark mode: `pytest bench/bench_events.py` (bench/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------

_PYTEST_BACKENDS = ("reference", "numpy") if harness.PYTEST_SMOKE else ("cuda", "triton", "numpy")


@pytest.mark.parametrize("backend", _PYTEST_BACKENDS)
@pytest.mark.parametrize(
    "config", configs(smoke=harness.PYTEST_SMOKE, quick=not harness.PYTEST_SMOKE), ids=str
)
def test_events_to_frames(benchmark, config: Config, backend: str) -> None:
    if backend == "cuda" and not harness.extension_built():
        pytest.skip("crossspec_kernels._C is not built")
    inputs = make_inputs(config, harness.PYTEST_DEVICE)
    problems = run_checked(backend, config, inputs)
    assert not problems, problems
    fn = op_callable(backend, config, inputs)
    harness.pytest_benchmark(benchmark, fn, config, config.bytes_moved, host=backend in BASELINES)


def test_numpy_baseline_matches_the_spec() -> None:
    """The baseline is a fair one only if it computes the same thing, on the edge cases too."""
    for num_events in (0, 1, 3, 3001):
        for representation in REPRESENTATIONS:
            config = Config(representation, num_events, *SMOKE_SENSOR)
            got = numpy_baseline(config, host_events(num_events, *SMOKE_SENSOR)["numpy"])
            assert not compare(config, torch.from_numpy(got)), str(config)


def test_script_smoke(tmp_path) -> None:
    """`python bench/bench_events.py --smoke --quick --out DIR` runs end to end and writes its JSON."""
    assert main(["--smoke", "--quick", "--out", str(tmp_path)]) == 0
    written = list(tmp_path.glob("events_to_frames-*.json"))
    assert len(written) == 1 and '"smoke_test": true' in written[0].read_text()


if __name__ == "__main__":
    sys.exit(main())
