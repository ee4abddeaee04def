"""crossspec_kernels.events_to_frames: hand-checked cases of the reference, triton (the CPU
interpreter here) and cuda against the reference, determinism, bounds safety, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from crossspec_kernels import events_to_frames, reference
from crossspec_kernels.ops._dispatch import triton_interpreting
from crossspec_kernels.reference import VOXEL_FIXED_POINT_BITS

SENSOR = (37, 53)  # (H, W): odd, not a multiple of any block or of the 16 pixels of a flag word
WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)

needs_interpreter = pytest.mark.skipif(
    not triton_interpreting() and not torch.cuda.is_available(),
    reason="triton needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)",
)


def make_events(
    num_events: int,
    sensor=SENSOR,
    *,
    seed: int = 0,
    coord_dtype=torch.int32,
    polarity_dtype=torch.int8,
    time_span: int = 50_000,
    device="cpu",
):
    """Random in-range events with sorted timestamps (duplicates likely at these sizes)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = sensor
    x = torch.randint(0, width, (num_events,), generator=generator).to(coord_dtype)
    y = torch.randint(0, height, (num_events,), generator=generator).to(coord_dtype)
    t = torch.randint(0, time_span + 1, (num_events,), generator=generator).sort().values
    positive = torch.rand(num_events, generator=generator) < 0.5
    if polarity_dtype == torch.bool:
        p = positive
    elif polarity_dtype == torch.uint8:
        p = positive.to(torch.uint8)  # DSEC / tonic style 0/1
    else:
        p = torch.where(positive, 1, -1).to(polarity_dtype)  # EventGPT style -1/+1
    return tuple(v.to(device) for v in (x, y, t, p))


def voxel_bound(x, y, reference_grid: torch.Tensor, sensor=SENSOR) -> torch.Tensor:
    """The documented tolerance per cell versus the fp64 grid, (events at the pixel) * 2**-25 +
    2**-24 * |value|, plus 2**-24 * |value| because the reference's output is rounded to fp32 too."""
    height, width = sensor
    per_pixel = torch.zeros(height * width, dtype=torch.float64)
    per_pixel.index_add_(0, (y.long() * width + x.long()).cpu(), torch.ones(x.numel(), dtype=torch.float64))
    quantization = per_pixel.view(1, height, width) * 2.0 ** -(VOXEL_FIXED_POINT_BITS + 1)
    return quantization + 2.0**-23 * reference_grid.double().abs() + 1e-30


def assert_voxel_close(got: torch.Tensor, expected: torch.Tensor, x, y, sensor=SENSOR) -> None:
    assert got.dtype == torch.float32 and got.shape == expected.shape
    error = (got.double().cpu() - expected.double().cpu()).abs()
    bound = voxel_bound(x, y, expected.cpu(), sensor)
    assert bool((error <= bound).all()), (
        f"max error {error.max().item():.3g}, worst ratio {(error / bound).max():.3g}"
    )


def run(x, y, t, p, representation, backend, sensor=SENSOR, **kwargs):
    return events_to_frames(
        x, y, t, p, sensor_size=sensor, representation=representation, backend=backend, **kwargs
    )


# ----------------------------------------------------------------------------------------------
# The reference on cases worked out by hand
# ----------------------------------------------------------------------------------------------


def hand_events():
    # (x, y, t, p): pixel (0, 0) gets both polarities in chunk 0 (red wins), (2, 1) only negative.
    x = torch.tensor([0, 0, 2, 1, 2, 1], dtype=torch.int16)
    y = torch.tensor([0, 0, 1, 0, 1, 0], dtype=torch.int16)
    t = torch.tensor([0, 0, 10, 20, 30, 40])
    p = torch.tensor([-1, 1, -1, 1, 1, -1], dtype=torch.int8)
    return x, y, t, p


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_eventgpt_by_hand(backend):
    frames = run(*hand_events(), "eventgpt", backend, sensor=(2, 3), num_frames=2)
    assert frames.shape == (2, 3, 2, 3) and frames.dtype == torch.uint8
    color = lambda f, yy, xx: tuple(frames[f, :, yy, xx].tolist())
    # chunk 0 = events 0..2: (0,0) pos+neg -> red, (2,1) neg -> blue, the rest white
    assert color(0, 0, 0) == RED and color(0, 1, 2) == BLUE and color(0, 0, 1) == WHITE
    # chunk 1 = events 3..5: (1,0) pos then neg -> red, (2,1) pos -> red, (0,0) untouched -> white
    assert color(1, 0, 1) == RED and color(1, 1, 2) == RED and color(1, 0, 0) == WHITE


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_histogram_and_voxel_by_hand(backend):
    events = hand_events()
    histogram = run(*events, "histogram", backend, sensor=(2, 3))
    expected = torch.zeros(2, 2, 3, dtype=torch.int32)
    expected[0, 0, 0] = expected[0, 1, 2] = expected[0, 0, 1] = 1  # negatives
    expected[1, 0, 0] = expected[1, 0, 1] = expected[1, 1, 2] = 1  # positives
    assert torch.equal(histogram, expected)

    voxel = run(*events, "voxel", backend, sensor=(2, 3), num_bins=3)
    # t_norm = 2 * t / 40 = 0, 0, 0.5, 1, 1.5, 2
    grid = torch.zeros(3, 2, 3, dtype=torch.float64)
    grid[0, 0, 0] += -1 + 1  # events 0 and 1 cancel
    grid[0, 1, 2] += -0.5
    grid[1, 1, 2] += -0.5  # event 2
    grid[1, 0, 1] += 1  # event 3
    grid[1, 1, 2] += 0.5
    grid[2, 1, 2] += 0.5  # event 4
    grid[2, 0, 1] += -1  # event 5
    assert torch.equal(voxel, grid.float())


def test_voxel_normalize_by_hand():
    x, y, t, p = (torch.tensor(v) for v in ([0, 1, 2], [0, 0, 0], [0, 5, 10], [1, 1, 0]))
    voxel = run(x, y, t, p, "voxel", "reference", sensor=(1, 3), num_bins=2, normalize=True)
    # bins: (0,0) = 1, (0,1) = 0.5, (1,1) = 0.5, (1,2) = -1; mean 0.25, unbiased std sqrt(0.75)
    values = torch.tensor([1.0, 0.5, 0.5, -1.0], dtype=torch.float64)
    normalized = ((values - 0.25) / values.std()).float()
    assert torch.equal(voxel[0, 0], torch.stack([normalized[0], normalized[1], torch.tensor(0.0)]))
    assert torch.equal(voxel[1, 0], torch.stack([torch.tensor(0.0), normalized[2], normalized[3]]))


def test_voxel_normalize_leaves_degenerate_grids_alone():
    x, y, t, p = (torch.tensor(v) for v in ([0, 1], [0, 0], [7, 7], [1, 1]))
    # Two equal nonzero entries: std == 0 -> unchanged (DSEC would subtract the mean).
    for backend in ("reference", "triton") if triton_interpreting() else ("reference",):
        voxel = run(x, y, t, p, "voxel", backend, sensor=(1, 2), num_bins=2, normalize=True)
        assert torch.equal(voxel, torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]]))
        empty = run(
            *(v[:0] for v in (x, y, t, p)), "voxel", backend, sensor=(1, 2), num_bins=2, normalize=True
        )
        assert torch.equal(empty, torch.zeros(2, 1, 2))


# ----------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) against the reference
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("num_events", [0, 1, 7, 1000, 5003])
@pytest.mark.parametrize("representation", ["eventgpt", "histogram", "voxel"])
def test_triton_matches_reference(num_events, representation):
    x, y, t, p = make_events(num_events, seed=num_events)
    kwargs = dict(num_frames=5, num_bins=5)
    got = run(x, y, t, p, representation, "triton", **kwargs)
    expected = run(x, y, t, p, representation, "reference", **kwargs)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if representation == "voxel":
        assert_voxel_close(got, expected, x, y)
    else:
        assert torch.equal(got, expected)
    if representation == "histogram":
        assert int(got.sum()) == num_events


@needs_interpreter
@pytest.mark.parametrize(
    "coord_dtype, polarity_dtype",
    [
        (torch.int16, torch.bool),
        (torch.int64, torch.uint8),
        (torch.int32, torch.int64),
        (torch.int16, torch.int32),
    ],
)
def test_triton_dtypes(coord_dtype, polarity_dtype):
    x, y, t, p = make_events(777, seed=3, coord_dtype=coord_dtype, polarity_dtype=polarity_dtype)
    for representation in ("eventgpt", "histogram"):
        got = run(x, y, t, p, representation, "triton", num_frames=3)
        assert torch.equal(got, run(x, y, t, p, representation, "reference", num_frames=3))
    got = run(x, y, t, p, "voxel", "triton", num_bins=4)
    assert_voxel_close(got, run(x, y, t, p, "voxel", "reference", num_bins=4), x, y)


@needs_interpreter
def test_triton_mixed_coordinate_dtypes():
    x, y, t, p = make_events(300, seed=4)
    got = run(x.to(torch.int16), y.to(torch.int64), t, p, "histogram", "triton")
    assert torch.equal(got, run(x, y, t, p, "histogram", "reference"))


@needs_interpreter
@pytest.mark.parametrize("num_events, num_frames", [(3, 7), (1, 5), (10, 10), (11, 4)])
def test_eventgpt_more_frames_than_events(num_events, num_frames):
    x, y, t, p = make_events(num_events, seed=num_events)
    got = run(x, y, t, p, "eventgpt", "triton", num_frames=num_frames)
    expected = run(x, y, t, p, "eventgpt", "reference", num_frames=num_frames)
    assert torch.equal(got, expected)
    bounds = reference.eventgpt_chunk_bounds(num_events, num_frames)
    for frame, (start, end) in enumerate(bounds):
        white = bool((got[frame] == 255).all())
        assert white == (start == end), f"frame {frame} [{start}, {end}) white={white}"


@needs_interpreter
def test_duplicate_pixels_with_both_polarities():
    """Many events on few pixels, both polarities, in every order: red must win in any chunk that
    has a positive event at the pixel, regardless of order; counts must be exact."""
    generator = torch.Generator().manual_seed(5)
    num_events = 2000
    pixels = torch.tensor([[0, 0], [52, 36], [17, 20], [16, 20]])  # (x, y); the last two share a flag word
    choice = torch.randint(0, len(pixels), (num_events,), generator=generator)
    x, y = pixels[choice, 0].to(torch.int32), pixels[choice, 1].to(torch.int32)
    p = torch.randint(0, 2, (num_events,), generator=generator, dtype=torch.uint8)
    p[(choice == 3).nonzero()[:, 0]] = 0  # one pixel sees only negative events: blue everywhere
    t = torch.arange(num_events) // 7
    for representation in ("eventgpt", "histogram"):
        got = run(x, y, t, p, representation, "triton", num_frames=6)
        assert torch.equal(got, run(x, y, t, p, representation, "reference", num_frames=6))
    frames = run(x, y, t, p, "eventgpt", "triton", num_frames=6)
    assert tuple(frames[0, :, 20, 16].tolist()) == BLUE and tuple(frames[0, :, 36, 52].tolist()) == RED
    voxel = run(x, y, t, p, "voxel", "triton", num_bins=5)
    assert_voxel_close(voxel, run(x, y, t, p, "voxel", "reference", num_bins=5), x, y)


@needs_interpreter
@pytest.mark.parametrize("num_bins", [1, 2, 5, 9])
def test_voxel_equal_timestamps_and_bins(num_bins):
    x, y, t, p = make_events(1500, seed=num_bins, time_span=40)  # many equal timestamps
    got = run(x, y, t, p, "voxel", "triton", num_bins=num_bins)
    assert_voxel_close(got, run(x, y, t, p, "voxel", "reference", num_bins=num_bins), x, y)
    # all timestamps equal: t_norm = 0, everything lands in bin 0
    same_t = torch.full_like(t, 123)
    got = run(x, y, same_t, p, "voxel", "triton", num_bins=num_bins)
    histogram = run(x, y, same_t, p, "histogram", "reference")
    assert torch.equal(got[0], (histogram[1] - histogram[0]).float())
    assert not bool(got[1:].any())


@needs_interpreter
def test_voxel_normalize_matches_reference():
    x, y, t, p = make_events(3001, seed=8)
    got = run(x, y, t, p, "voxel", "triton", num_bins=5, normalize=True)
    expected = run(x, y, t, p, "voxel", "reference", num_bins=5, normalize=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    nonzero = got[got != 0].double()
    assert abs(float(nonzero.mean())) < 1e-5 and abs(float(nonzero.std()) - 1) < 1e-5


@needs_interpreter
def test_voxel_large_timestamps():
    """Microsecond clocks of long recordings: offsets near 2**40 must not lose the bins."""
    x, y, t, p = make_events(900, seed=9, time_span=10**9)
    t = t + (1 << 40)
    got = run(x, y, t, p, "voxel", "triton", num_bins=7)
    assert_voxel_close(got, run(x, y, t, p, "voxel", "reference", num_bins=7), x, y)


@needs_interpreter
def test_triton_kernels_skip_out_of_range_events():
    """Unchecked input (check=False on a GPU) must not write out of bounds: the kernels skip such
    events. Called through the launcher, as ops does for CUDA tensors with check=False."""
    from crossspec_kernels.triton.events_to_frames import events_to_frames as launcher

    x, y, t, p = make_events(600, seed=10, coord_dtype=torch.int64)
    bad_x, bad_y = x.clone(), y.clone()
    bad_x[1::5] += SENSOR[1]  # x >= W
    bad_y[2::5] = -1 - bad_y[2::5]  # y < 0
    bad_x[3::5] = -(1 << 40)  # would wrap a 32-bit offset
    keep = torch.ones(600, dtype=torch.bool)
    keep[1::5] = keep[2::5] = keep[3::5] = False  # the first and last events stay: same time scale
    kept = (x[keep], y[keep], t[keep], p[keep])
    height, width = SENSOR
    for representation, slices in (("eventgpt", 1), ("histogram", 1), ("voxel", 4)):
        got = launcher(
            bad_x, bad_y, t, p, height=height, width=width, representation=representation, num_slices=slices
        )
        expected = run(*kept, representation, "reference", num_frames=1, num_bins=4)
        if representation == "voxel":
            assert_voxel_close(got, expected, *kept[:2])
        else:
            assert torch.equal(got, expected)


@needs_interpreter
def test_triton_is_deterministic():
    x, y, t, p = make_events(4000, seed=11)
    for representation in ("eventgpt", "histogram", "voxel"):
        first = run(x, y, t, p, representation, "triton")
        assert torch.equal(first, run(x, y, t, p, representation, "triton"))


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a device)
# ----------------------------------------------------------------------------------------------


def gpu_backends() -> list[str]:
    from crossspec_kernels import _ext

    return (["cuda"] if _ext.is_available() else []) + ["triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("num_events", [0, 1, 7, 5003, 1_000_000])
def test_gpu_backend_matches_reference(backend, num_events):
    if backend not in gpu_backends():
        pytest.skip("crossspec_kernels._C is not built")
    sensor = (480, 640) if num_events == 1_000_000 else SENSOR
    x, y, t, p = make_events(num_events, sensor, seed=12, coord_dtype=torch.int16, time_span=10**6)
    cuda_events = tuple(v.cuda() for v in (x, y, t, p))
    for representation in ("eventgpt", "histogram", "voxel"):
        expected = run(x, y, t, p, representation, "reference", sensor=sensor)
        first = run(*cuda_events, representation, backend, sensor=sensor)
        second = run(*cuda_events, representation, backend, sensor=sensor, check=False)
        assert first.is_cuda and torch.equal(first, second), f"{representation}: runs differ"
        if representation == "voxel":
            assert_voxel_close(first, expected, x, y, sensor)
        else:
            assert torch.equal(first.cpu(), expected)
    got = run(*cuda_events, "voxel", backend, sensor=sensor, normalize=True)
    expected = run(x, y, t, p, "voxel", "reference", sensor=sensor, normalize=True)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_cuda_and_triton_are_bit_identical():
    if "cuda" not in gpu_backends():
        pytest.skip("crossspec_kernels._C is not built")
    events = tuple(v.cuda() for v in make_events(200_000, (480, 640), seed=13, polarity_dtype=torch.bool))
    for representation in ("eventgpt", "histogram", "voxel"):
        a = run(*events, representation, "cuda", sensor=(480, 640))
        b = run(*events, representation, "triton", sensor=(480, 640))
        assert torch.equal(a, b), representation


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_unchecked_out_of_range_events_are_skipped(backend):
    if backend not in gpu_backends():
        pytest.skip("crossspec_kernels._C is not built")
    x, y, t, p = make_events(10_000, seed=14, coord_dtype=torch.int64)
    bad_x = x.clone()
    bad_x[::3] = torch.where(torch.arange(len(x[::3])) % 2 == 0, -(1 << 40), 1 << 40)
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[::3] = False
    got = run(bad_x.cuda(), y.cuda(), t.cuda(), p.cuda(), "histogram", backend, check=False)
    assert torch.equal(got.cpu(), run(x[keep], y[keep], t[keep], p[keep], "histogram", "reference"))
    with pytest.raises(ValueError, match=r"events_to_frames: \d+ of 10000 events have x outside"):
        run(bad_x.cuda(), y.cuda(), t.cuda(), p.cuda(), "histogram", backend, check=True)


# ----------------------------------------------------------------------------------------------
# The extension's binding (built wherever nvcc was found; runs without a GPU)
# ----------------------------------------------------------------------------------------------

BINDING_KEYWORDS = (
    "representation", "x", "y", "coord_dtype", "t", "p", "polarity_dtype", "num_events", "height",
    "width", "num_slices", "fixed_point_bits", "workspace", "output", "stream",
)  # fmt: skip


def binding():
    from crossspec_kernels import _ext

    if not _ext.is_available():
        pytest.skip("crossspec_kernels._C not built (installed without nvcc)")
    return _ext.get_module().events_to_frames


def binding_arguments(**changes):
    base = dict.fromkeys(BINDING_KEYWORDS, 0) | {"coord_dtype": 3, "height": 4, "width": 4, "num_slices": 1}
    return base | {"fixed_point_bits": VOXEL_FIXED_POINT_BITS} | changes


def test_binding_takes_keyword_arguments_only():
    function = binding()
    for keyword in BINDING_KEYWORDS:
        assert f"{keyword}:" in function.__doc__, f"events_to_frames has no keyword {keyword!r}"
    with pytest.raises(TypeError):
        function(*range(len(BINDING_KEYWORDS)))
    with pytest.raises(TypeError):
        function(x=0)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        (
            {"representation": 3},
            r"representation must be 0 \(eventgpt\), 1 \(histogram\) or 2 \(voxel\), got 3",
        ),
        ({"coord_dtype": 1}, r"coord_dtype must be 2 \(int16\), 3 \(int32\) or 4 \(int64\), got 1"),
        ({"coord_dtype": 7}, r"coord_dtype must be a dtype code .*got 7"),
        ({"polarity_dtype": -1}, r"polarity_dtype must be a dtype code .*got -1"),
    ],
)
def test_binding_rejects_bad_codes(changes, pattern):
    with pytest.raises(ValueError, match=r"^crossspec_kernels\._C\.events_to_frames: " + pattern):
        binding()(**binding_arguments(**changes))


def test_binding_raises_on_invalid_launch():
    # Null output and workspace: the launcher refuses before touching the device, on any machine.
    with pytest.raises(RuntimeError, match=r"^crossspec_kernels\._C\.events_to_frames: \S"):
        binding()(**binding_arguments(representation=2, num_events=5, x=8, y=8, t=8, p=8))


# ----------------------------------------------------------------------------------------------
# Bad inputs: named errors
# ----------------------------------------------------------------------------------------------


def good_events():
    return make_events(20, seed=15)


def with_replaced(index, value):
    events = list(good_events())
    events[index] = value
    return events


BAD_INPUTS = [
    # (events, kwargs, message pattern)
    (
        with_replaced(0, torch.zeros(20, 1, dtype=torch.int32)),
        {},
        r"x must be 1-D \[n\], got shape \(20, 1\)",
    ),
    (
        with_replaced(1, torch.zeros(19, dtype=torch.int32)),
        {},
        r"must have the same length n, got y of length 19",
    ),
    (with_replaced(0, torch.zeros(20)), {}, r"x must be int16, int32 or int64, got torch.float32"),
    (
        with_replaced(1, torch.zeros(20, dtype=torch.uint8)),
        {},
        r"y must be int16, int32 or int64, got torch.uint8",
    ),
    (
        with_replaced(2, torch.zeros(20, dtype=torch.int32)),
        {},
        r"t must be int64 \(microseconds\), got torch.int32",
    ),
    (with_replaced(3, torch.zeros(20)), {}, r"p must be bool or an integer dtype"),
    (
        with_replaced(2, torch.zeros(20, dtype=torch.int64, device="meta")),
        {},
        r"t is on meta but x is on cpu",
    ),
    (
        good_events(),
        {"sensor_size": (37,)},
        r"sensor_size must be a \(height, width\) pair of ints, got \(37,\)",
    ),
    (good_events(), {"sensor_size": (37.0, 53)}, r"sensor_size must be a \(height, width\) pair of ints"),
    (
        good_events(),
        {"sensor_size": (0, 53)},
        r"sensor_size \(height, width\) must be in \[1, 65535\] each, got \(0, 53\)",
    ),
    (good_events(), {"representation": "voxels"}, r"representation must be one of .*got 'voxels'"),
    (good_events(), {"num_frames": 0}, r"num_frames must be an int in \[1, 4096\], got 0"),
    (good_events(), {"num_bins": 5000}, r"num_bins must be an int in \[1, 4096\], got 5000"),
    (good_events(), {"num_bins": 2.0}, r"num_bins must be an int in \[1, 4096\], got 2.0"),
    (good_events(), {"normalize": True}, r"normalize=True applies to representation='voxel' only"),
    (good_events(), {"check": "yes"}, r"check must be a bool"),
    (good_events(), {"backend": "numpy"}, r"backend must be one of"),
    (good_events(), {"backend": "cuda"}, r"backend='cuda' needs CUDA tensors"),
    (
        with_replaced(0, torch.full((20,), 53, dtype=torch.int32)),
        {},
        r"20 of 20 events have x outside \[0, W = 53\)",
    ),
    (
        with_replaced(1, torch.arange(20, dtype=torch.int32) * 2 - 1),
        {},
        r"2 of 20 events have y outside \[0, H = 37\)",
    ),
    (
        with_replaced(2, torch.arange(20).flip(0)),
        {},
        r"t must be sorted non-decreasing, got 19 decreasing steps",
    ),
]


@pytest.mark.parametrize("events, kwargs, pattern", BAD_INPUTS, ids=[b[2][:40] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_bad_inputs_raise_named_errors(events, kwargs, pattern, backend):
    kwargs = {"sensor_size": SENSOR, "backend": backend, **kwargs}
    with pytest.raises(ValueError, match=r"^events_to_frames: .*" + pattern):
        events_to_frames(*events, **kwargs)


def test_non_tensor_input_is_a_type_error():
    x, y, t, p = good_events()
    with pytest.raises(TypeError, match=r"events_to_frames: p must be a torch.Tensor, got list"):
        events_to_frames(x, y, t, p.tolist(), sensor_size=SENSOR)


def test_default_backend_on_cpu_and_package_export():
    import crossspec_kernels

    assert crossspec_kernels.events_to_frames is events_to_frames
    assert "events_to_frames" in crossspec_kernels.__all__
    x, y, t, p = good_events()
    frames = events_to_frames(x, y, t, p, sensor_size=SENSOR)  # defaults: eventgpt, 5 frames
    assert frames.shape == (5, 3, *SENSOR) and frames.dtype == torch.uint8


# ----------------------------------------------------------------------------------------------
# torch.compile: through the crossspec::events_to_frames custom op
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("representation", ["eventgpt", "histogram", "voxel"])
def test_compiles_with_fullgraph(backend, representation):
    torch._dynamo.reset()
    events = make_events(500, seed=7)

    def rasterize(x, y, t, p):
        return run(
            x, y, t, p, representation, backend, num_frames=3, num_bins=4, normalize=representation == "voxel"
        )

    got = torch.compile(rasterize, fullgraph=True, backend="aot_eager")(*events)
    assert torch.equal(got, rasterize(*events))


def test_custom_op_passes_opcheck():
    x, y, t, p = make_events(200, seed=8)
    for representation in ("eventgpt", "histogram", "voxel"):
        torch.library.opcheck(
            torch.ops.crossspec.events_to_frames.default,
            (x, y, t, p, *SENSOR, representation, 3, representation == "voxel", "reference"),
        )
