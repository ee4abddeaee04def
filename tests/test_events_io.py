"""crossspec_kernels.events: EventStream, DSEC h5 and EventGPT npy files, synthetic clips, bad inputs."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from crossspec_kernels.events import (
    DSECEventFile,
    EventStream,
    UnsafePickleError,
    frame_times_us,
    load_eventgpt_npy,
    save_eventgpt_npy,
    synthetic_clip,
    write_dsec_h5,
)

h5py = pytest.importorskip("h5py")

SENSOR = (48, 64)  # (height, width)


def random_events(num_events: int, duration_us: int, seed: int, sensor_size=SENSOR) -> dict[str, np.ndarray]:
    """Sorted random events with repeated timestamps (bursts share a microsecond on real sensors)."""
    rng = np.random.default_rng(seed)
    height, width = sensor_size
    return {
        "x": rng.integers(0, width, num_events).astype(np.uint16),
        "y": rng.integers(0, height, num_events).astype(np.uint16),
        "t": np.sort(rng.integers(0, duration_us, num_events)).astype(np.int64),
        "p": rng.integers(0, 2, num_events).astype(np.uint8),
    }


def random_stream(num_events: int, duration_us: int, seed: int, sensor_size=SENSOR) -> EventStream:
    events = random_events(num_events, duration_us, seed, sensor_size)
    return EventStream(events["x"], events["y"], events["t"], events["p"], sensor_size)


def brute_force_window(stream: EventStream, t0: int, t1: int) -> dict[str, torch.Tensor]:
    keep = (stream.t >= t0) & (stream.t < t1)
    return {name: getattr(stream, name)[keep] for name in "xytp"}


def assert_stream_equals(got: EventStream, expected: dict[str, torch.Tensor], what: str) -> None:
    for name in "xytp":
        value = getattr(got, name)
        assert torch.equal(value.long(), expected[name].long()), f"{what}: {name} differs"


def windows(duration_us: int, seed: int) -> list[tuple[int, int]]:
    """Random windows plus the edge cases: empty, exact milliseconds, past the end, before the start."""
    rng = np.random.default_rng(seed)
    chosen = [
        (int(a), int(a + b)) for a, b in zip(rng.integers(0, duration_us, 12), rng.integers(0, 20_000, 12))
    ]
    chosen += [
        (5_000, 5_000),  # empty: t0 == t1
        (3_000, 7_000),  # exact millisecond bounds
        (2_999, 3_001),
        (duration_us - 1_500, duration_us + 50_000),  # t1 beyond the last event
        (-10_000, 1_234),  # t0 before the first event
        (duration_us + 1_000, duration_us + 9_000),  # entirely after the last event
        (-5_000, -1),  # entirely before
        (-1, duration_us + 1),  # everything
    ]
    return chosen


# ----------------------------------------------------------------------------------------------
# EventStream
# ----------------------------------------------------------------------------------------------


def test_stream_normalises_dtypes_and_polarity():
    x = np.array([1, 63, 0], dtype=np.uint16)
    y = np.array([0, 47, 5], dtype=np.uint16)
    t = np.array([10, 10, 4_000_000_000], dtype=np.uint32)  # uint32 beyond int32: must widen, not wrap
    for p, expected in [
        (np.array([-1, 1, -1], dtype=np.int8), [0, 1, 0]),
        (np.array([True, False, True]), [1, 0, 1]),
        (torch.tensor([1.0, 0.0, 1.0]), [1, 0, 1]),
        (np.array([0, 0, 1], dtype=np.uint8), [0, 0, 1]),
    ]:
        stream = EventStream(x, y, t, p, SENSOR)
        assert (stream.x.dtype, stream.y.dtype, stream.t.dtype, stream.p.dtype) == (
            torch.int16,
            torch.int16,
            torch.int64,
            torch.int8,
        )
        assert stream.p.tolist() == expected
        assert stream.t.tolist() == [10, 10, 4_000_000_000]
    assert stream.x.tolist() == [1, 63, 0] and stream.y.tolist() == [0, 47, 5]
    assert len(stream) == 3 and stream.duration_us == 4_000_000_000 - 10
    assert stream.num_dropped == 0


def test_stream_wide_sensor_uses_int32_coordinates():
    stream = EventStream(
        torch.tensor([40_000]), torch.tensor([3]), torch.tensor([0]), torch.tensor([1]), (10, 50_000)
    )
    assert stream.x.dtype == torch.int32 and stream.x.tolist() == [40_000]


def test_empty_stream():
    empty = np.zeros(0, dtype=np.int64)
    stream = EventStream(empty, empty, empty, empty, SENSOR)
    assert len(stream) == 0 and stream.duration_us == 0
    assert len(stream.slice_time(0, 100)) == 0
    assert "empty" in repr(stream)
    assert stream.validate() is stream


def test_slice_time_matches_brute_force():
    stream = random_stream(5_000, 200_000, seed=1)
    for t0, t1 in windows(200_000, seed=2) + [(int(stream.t[17]), int(stream.t[17]) + 1)]:
        window = stream.slice_time(t0, t1)
        assert_stream_equals(window, brute_force_window(stream, t0, t1), f"window [{t0}, {t1})")
        # Slices are views: no copy of a long stream per window.
        if len(window):
            assert window.t.untyped_storage().data_ptr() == stream.t.untyped_storage().data_ptr()
    assert len(stream.slice_time(int(stream.t[17]), int(stream.t[17]) + 1)) >= 1


def test_clip_drop_reports_what_it_drops():
    x = np.array([0, 64, 5, -1, 63])  # 64 and -1 are outside a 64-wide sensor
    y = np.array([0, 1, 48, 2, 47])  # 48 is outside a 48-tall sensor
    t = np.arange(5)
    with pytest.warns(UserWarning, match="dropped 3 events"):
        stream = EventStream(x, y, t, np.ones(5, dtype=np.int8), SENSOR, clip="drop")
    assert stream.num_dropped == 3
    assert stream.x.tolist() == [0, 63] and stream.t.tolist() == [0, 4]


def test_validate_catches_in_place_edits():
    stream = random_stream(100, 10_000, seed=3)
    stream.t[50] = -5
    with pytest.raises(ValueError, match=r"t\[50\] = -5 < t\[49\]"):
        stream.validate()


def test_to_same_device_is_identity():
    stream = random_stream(10, 1_000, seed=4)
    assert stream.to("cpu") is stream


@pytest.mark.gpu
def test_to_cuda_then_slice():
    stream = random_stream(2_000, 100_000, seed=5)
    on_gpu = stream.to("cuda")
    assert on_gpu.t.is_cuda and on_gpu.sensor_size == stream.sensor_size
    window = on_gpu.slice_time(20_000, 40_000).to("cpu")
    assert_stream_equals(window, brute_force_window(stream, 20_000, 40_000), "cuda slice")


def test_to_frames_forwards_to_the_op():
    ops = pytest.importorskip("crossspec_kernels.ops.events_to_frames")
    stream = random_stream(500, 50_000, seed=6)
    got = stream.to_frames(num_frames=3)
    expected = ops.events_to_frames(stream.x, stream.y, stream.t, stream.p, sensor_size=SENSOR, num_frames=3)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------
# DSEC events.h5
# ----------------------------------------------------------------------------------------------

T_OFFSET = 1_600_000_000_000_000  # absolute µs, the order of DSEC's offsets


@pytest.fixture(scope="module")
def dsec_file(tmp_path_factory):
    """A written DSEC file and the stream it holds (absolute times)."""
    stream = random_stream(20_000, 300_000, seed=7)
    absolute = EventStream(stream.x, stream.y, stream.t + T_OFFSET, stream.p, SENSOR)
    path = tmp_path_factory.mktemp("dsec") / "events.h5"
    write_dsec_h5(path, absolute, t_offset=T_OFFSET)
    return path, stream


def test_dsec_ms_to_idx_follows_its_definition(dsec_file):
    path, stream = dsec_file
    with h5py.File(path, "r") as file:
        ms_to_idx = file["ms_to_idx"][:].astype(np.int64)
        times = file["events/t"][:].astype(np.int64)
        assert int(file["t_offset"][()]) == T_OFFSET
    assert np.array_equal(times, stream.t.numpy())
    for ms, index in enumerate(ms_to_idx):
        assert index == len(times) or times[index] >= ms * 1000, f"ms {ms}"
        assert index == 0 or times[index - 1] < ms * 1000, f"ms {ms}"
    assert ms_to_idx[-1] == len(times)


def test_dsec_read_matches_brute_force(dsec_file):
    path, stream = dsec_file
    with DSECEventFile(path, sensor_size=SENSOR) as events:
        assert len(events) == len(stream) and events.t_offset == T_OFFSET
        assert events.time_range == (int(stream.t[0]), int(stream.t[-1]) + 1)
        for t0, t1 in windows(300_000, seed=8):
            expected = brute_force_window(stream, t0, t1)
            assert_stream_equals(events.read(t0, t1), expected, f"relative [{t0}, {t1})")
            absolute = events.read(t0 + T_OFFSET, t1 + T_OFFSET, absolute=True)
            expected["t"] = expected["t"] + T_OFFSET
            assert_stream_equals(absolute, expected, f"absolute [{t0}, {t1})")
        everything = events.read(*events.time_range)
        assert len(everything) == len(stream)


def test_dsec_read_touches_only_the_window(tmp_path):
    """Every event outside a window's millisecond bracket holds garbage: unsorted t, coordinates
    off the sensor, polarity 9. A reader that loads more than the bracket (+ the events it checks
    at each end) fails or returns wrong events."""
    stream = random_stream(200_000, 2_000_000, seed=9)
    path = tmp_path / "big.h5"
    write_dsec_h5(path, stream)
    t0, t1 = 1_234_567, 1_240_321
    times = stream.t.numpy()
    keep_from = np.searchsorted(times, (t0 // 1000 - 1) * 1000)  # one more millisecond each side
    keep_to = np.searchsorted(times, (-(-t1 // 1000) + 1) * 1000)
    start, stop = np.searchsorted(times, t0), np.searchsorted(times, t1)
    with h5py.File(path, "r+") as file:
        for name, garbage in (("x", 60_000), ("y", 60_000), ("p", 9)):
            data = file[f"events/{name}"]
            data[:start], data[stop:] = garbage, garbage
        data = file["events/t"]
        data[:keep_from] = 4_000_000_000  # later than everything after it: unsorted
        data[keep_to:] = 0
    with DSECEventFile(path, sensor_size=SENSOR) as events:
        window = events.read(t0, t1)
    assert len(window) == stop - start > 0
    assert_stream_equals(window, brute_force_window(stream, t0, t1), "bounded read")


def test_dsec_detects_a_corrupt_ms_to_idx(tmp_path):
    stream = random_stream(5_000, 100_000, seed=10)
    path = tmp_path / "events.h5"
    write_dsec_h5(path, stream)
    with h5py.File(path, "r+") as file:
        file["ms_to_idx"][50] += 40  # points past events of the 50th millisecond
    with DSECEventFile(path, sensor_size=SENSOR) as events, pytest.raises(ValueError, match="ms_to_idx"):
        events.read(50_000, 50_500)


def test_dsec_empty_file(tmp_path):
    empty = np.zeros(0, dtype=np.int64)
    path = tmp_path / "empty.h5"
    write_dsec_h5(path, EventStream(empty, empty, empty, empty, SENSOR))
    with DSECEventFile(path, sensor_size=SENSOR) as events:
        assert len(events) == 0 and events.time_range == (0, 0)
        assert len(events.read(0, 10_000)) == 0


# ----------------------------------------------------------------------------------------------
# EventGPT npy
# ----------------------------------------------------------------------------------------------


def test_eventgpt_npy_round_trip(tmp_path):
    stream = random_stream(3_000, 50_000, seed=11)
    path = save_eventgpt_npy(tmp_path / "sample", stream)
    assert path.name == "sample.npy" and path.is_file()
    loaded = load_eventgpt_npy(path, sensor_size=SENSOR)
    assert loaded.sensor_size == SENSOR
    assert_stream_equals(loaded, {name: getattr(stream, name) for name in "xytp"}, "round trip")


def test_eventgpt_npy_infers_sensor_size_and_reads_float_times(tmp_path):
    events = {
        "x": np.array([3, 99, 7]),
        "y": np.array([0, 5, 20]),
        "t": np.array([1.0, 2.0, 5.0]),
        "p": np.array([1, -1, 1]),
    }
    path = tmp_path / "float_t.npy"
    np.save(path, {**events, "label": "extra keys are ignored"}, allow_pickle=True)
    stream = load_eventgpt_npy(path)
    assert stream.sensor_size == (21, 100)
    assert stream.t.tolist() == [1, 2, 5] and stream.p.tolist() == [1, 0, 1]


def test_eventgpt_npy_structured_array(tmp_path):
    array = np.zeros(4, dtype=[("t", np.int64), ("x", np.uint16), ("y", np.uint16), ("p", np.int8)])
    array["t"], array["x"], array["y"], array["p"] = [0, 1, 1, 8], [1, 2, 3, 4], [4, 3, 2, 1], [1, 0, 1, 0]
    path = tmp_path / "structured.npy"
    np.save(path, array)
    stream = load_eventgpt_npy(path, sensor_size=(5, 5))
    assert stream.x.tolist() == [1, 2, 3, 4] and stream.t.tolist() == [0, 1, 1, 8]


class _CreatesFile:
    """A pickle payload: unpickling it calls open(path, "w"), so the file's existence tells whether it ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_eventgpt_npy_refuses_a_planted_pickle(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "planted.npy"
    np.save(path, {"x": _CreatesFile(marker), "y": ints(1), "t": ints(1), "p": ints(1)}, allow_pickle=True)
    with pytest.raises(UnsafePickleError, match=r"planted.npy refers to io.open, .*--trust-pickle"):
        load_eventgpt_npy(path)
    assert not marker.exists()
    # The payload is real: the explicit opt-in runs it (and then x, a file object, is refused).
    with pytest.raises(ValueError, match="'x' must be a numeric array, got TextIOWrapper"):
        load_eventgpt_npy(path, trust_pickle=True)
    assert marker.exists()


def test_eventgpt_npy_restricted_loader_reads_lists_and_numpy_scalars(tmp_path):
    path = tmp_path / "lists.npy"
    events = {"x": [1, 2], "y": [0, 3], "t": np.array([4.0, 9.0]), "p": [True, False], "n": np.int64(2)}
    np.save(path, events, allow_pickle=True)
    stream = load_eventgpt_npy(path, sensor_size=SENSOR)
    assert stream.x.tolist() == [1, 2] and stream.t.tolist() == [4, 9] and stream.p.tolist() == [1, 0]


def test_eventgpt_npy_unreadable_files(tmp_path):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    text = tmp_path / "text.npy"
    text.write_text("x,y,t,p\n1,2,3,1\n")
    truncated = tmp_path / "truncated.npy"
    save_eventgpt_npy(tmp_path / "whole.npy", random_stream(1_000, 10_000, seed=14))
    whole = (tmp_path / "whole.npy").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    for path in (empty, text, truncated):
        with pytest.raises(ValueError, match=rf"{path.name} is not a readable .npy file"):
            load_eventgpt_npy(path)


def events_dict(**changes):
    return {"x": ints(1, 2), "y": ints(1, 2), "t": ints(3, 4), "p": ints(0, 1), **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(x=None), "'x' must be a numeric array, got NoneType"),
        (dict(y=np.array(["a", "b"])), "'y' must be a numeric array, got dtype <U1"),
        (dict(p=np.zeros((2, 1))), r"'p' must be 1-D \[n\], got shape \(2, 1\)"),
        (dict(t=np.array([1.0, np.nan])), r"t must be finite whole microseconds, got t\[1\] = nan"),
        (dict(t=np.array([-np.inf, 1.0])), r"t must be finite whole microseconds, got t\[0\] = -inf"),
        (dict(t=np.array([1.0, 1e19])), r"t\[1\] = 1e\+19 does not fit int64"),
        (dict(t=np.array([1, 2**63], dtype=np.uint64)), r"t\[1\] = 9223372036854775808 does not fit int64"),
    ],
)
def test_eventgpt_npy_bad_fields_name_file_and_field(tmp_path, changes, message):
    path = tmp_path / "bad_field.npy"
    np.save(path, events_dict(**changes), allow_pickle=True)
    with pytest.raises(ValueError, match=rf"load_eventgpt_npy: .*bad_field.npy: .*{message}"):
        load_eventgpt_npy(path, sensor_size=SENSOR)


def test_stream_refuses_uint64_times_that_would_wrap():
    times = np.array([0, 2**63 + 5], dtype=np.uint64)
    for t in (times, torch.from_numpy(times)):
        with pytest.raises(ValueError, match=r"EventStream: t\[1\] = 9223372036854775813 does not fit int64"):
            EventStream(ints(0, 1), ints(0, 1), t, ints(0, 1), SENSOR)


def write_dsec_like(path, t=None, t_offset=None, **events):
    """A DSEC-shaped file with the given datasets replaced (t_offset=None leaves it out)."""
    data = {
        "x": np.array([1, 2], np.uint16),
        "y": np.array([1, 2], np.uint16),
        "p": np.array([0, 1], np.uint8),
    }
    data.update(events)
    data["t"] = np.array([10, 20], np.uint32) if t is None else t
    with h5py.File(path, "w") as file:
        for name, values in data.items():
            file.create_dataset(f"events/{name}", data=values)
        file.create_dataset("ms_to_idx", data=np.array([0, 2], np.uint64))
        if t_offset is not None:
            file.create_dataset("t_offset", data=t_offset)
    return path


@pytest.mark.parametrize(
    "t_offset, message",
    [
        ("abc", r"t_offset must be one integer \(int64 µs\), got dtype (object|\|S3)"),
        (np.array([1, 2]), r"t_offset must be one integer \(int64 µs\), got dtype int64, shape \(2,\)"),
        (np.float64("nan"), r"t_offset must be finite whole microseconds, got t_offset\[0\] = nan"),
        (np.float64(1.5), r"t_offset must be finite whole microseconds, got t_offset\[0\] = 1.5"),
    ],
)
def test_dsec_bad_t_offset(tmp_path, t_offset, message):
    path = write_dsec_like(tmp_path / "events.h5", t_offset=t_offset)
    with pytest.raises(ValueError, match=rf"DSECEventFile: .*events.h5: {message}"):
        DSECEventFile(path)


def test_dsec_t_offset_overflow_on_absolute_read(tmp_path):
    path = write_dsec_like(tmp_path / "events.h5", t_offset=np.int64(2**63 - 15))
    with DSECEventFile(path) as events:
        assert events.read(0, 1_000).t.tolist() == [10, 20]  # file time does not add the offset
        with pytest.raises(ValueError, match=r"events.h5: t \+ t_offset overflows int64"):
            events.read(events.t_offset, events.t_offset + 1_000, absolute=True)


@pytest.mark.parametrize(
    "t, message",
    [
        (np.array([10.0, np.nan]), r"events/t must be finite whole microseconds, got events/t\[1\] = nan"),
        (np.array([10.0, 20.5]), r"events/t must be finite whole microseconds, got events/t\[1\] = 20.5"),
        (np.array([10, 2**63 + 1], np.uint64), r"events/t\[1\] = 9223372036854775809 does not fit int64"),
        (np.array([b"a", b"b"]), r"events/t must hold numbers \(DSEC: uint32\), got dtype \|S1"),
    ],
)
def test_dsec_bad_times(tmp_path, t, message):
    path = write_dsec_like(tmp_path / "events.h5", t=t)
    with (
        pytest.raises(ValueError, match=rf"DSECEventFile: .*events.h5: {message}"),
        DSECEventFile(path) as events,
    ):
        events.read(*events.time_range)


def test_dsec_unreadable_files(tmp_path):
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    text = tmp_path / "text.h5"
    text.write_text("not an HDF5 file\n")
    whole = write_dsec_like(tmp_path / "whole.h5").read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(whole[: len(whole) // 2])
    for path in (empty, text, truncated):
        with pytest.raises(OSError, match=rf"{path.name} is not a readable HDF5 file .*empty, truncated"):
            DSECEventFile(path)


# ----------------------------------------------------------------------------------------------
# Synthetic clips
# ----------------------------------------------------------------------------------------------

SMALL_CLIP = dict(num_frames=6, height=60, width=80, duration_us=300_000)


@pytest.fixture(scope="module")
def small_clip():
    return synthetic_clip(**SMALL_CLIP, events_per_second=300_000, seed=3)


def test_synthetic_clip_is_a_valid_matching_pair(small_clip):
    events, video = small_clip
    assert events.sensor_size == (60, 80)
    events.validate()  # sorted, in bounds, 0/1 polarity
    assert video.shape == (6, 3, 60, 80) and video.dtype == torch.uint8
    assert int(events.t.min()) >= 0 and int(events.t.max()) < SMALL_CLIP["duration_us"]
    positive = float(events.p.float().mean())
    assert 0.3 < positive < 0.7, positive
    # Events are spread over the whole clip, not bunched at the start.
    counts = torch.histc(events.t.float(), bins=6, min=0, max=SMALL_CLIP["duration_us"])
    assert counts.min() > 0.5 * counts.mean(), counts


def test_synthetic_clip_is_deterministic(small_clip):
    events, video = small_clip
    again_events, again_video = synthetic_clip(**SMALL_CLIP, events_per_second=300_000, seed=3)
    other_events, _ = synthetic_clip(**SMALL_CLIP, events_per_second=300_000, seed=4)
    assert torch.equal(video, again_video)
    for name in "xytp":
        assert torch.equal(getattr(events, name), getattr(again_events, name)), name
    assert not torch.equal(events.x[:1000], other_events.x[:1000])


@pytest.mark.parametrize("events_per_second", [40_000, 1_000_000])
def test_synthetic_clip_hits_the_requested_rate(events_per_second):
    events, _ = synthetic_clip(**SMALL_CLIP, events_per_second=events_per_second, seed=1)
    requested = events_per_second * SMALL_CLIP["duration_us"] / 1e6
    assert abs(len(events) - requested) <= 0.05 * requested, (len(events), requested)


def test_synthetic_events_follow_the_video(small_clip):
    """Events between two frame times land where the luminance changed between those frames,
    and not where it changed in another pair of frames."""
    events, video = small_clip
    luminance = torch.log(
        (video.float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1) / 255 + 0.01
    )
    times = frame_times_us(SMALL_CLIP["num_frames"], SMALL_CLIP["duration_us"]).tolist()

    def event_map(first: int) -> torch.Tensor:
        window = events.slice_time(times[first], times[first + 1])
        counts = torch.zeros(60 * 80)
        counts.index_add_(0, window.y.long() * 80 + window.x.long(), torch.ones(len(window)))
        return counts

    def change(first: int) -> torch.Tensor:
        return (luminance[first + 1] - luminance[first]).abs().flatten()

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    # Polarity: ON where the scene got brighter, OFF where it got darker.
    window = events.slice_time(times[1], times[2])
    brightening = (luminance[2] - luminance[1])[window.y.long(), window.x.long()]
    on = window.p == 1
    assert float((brightening[on] > 0).float().mean()) > 0.8
    assert float((brightening[~on] < 0).float().mean()) > 0.8

    matched = correlation(event_map(1), change(1))
    mismatched = correlation(event_map(1), change(4))
    assert matched > 0.7, matched
    assert matched > mismatched + 0.2, (matched, mismatched)


def test_synthetic_static_scene_warns_when_short():
    with pytest.warns(UserWarning, match="fewer than the"):
        events, _ = synthetic_clip(
            num_frames=2, height=16, width=16, duration_us=50_000, events_per_second=1e9, num_objects=0
        )
    assert len(events) < 50_000


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def ints(*values):
    return np.array(values, dtype=np.int64)


STREAM_ERRORS = [
    (dict(x=ints(1, 2), y=ints(1), t=ints(0, 1), p=ints(0, 1)), "same length"),
    (dict(x=np.zeros((2, 2), dtype=np.int64)), r"x must be 1-D \[n\], got shape \(2, 2\)"),
    (dict(t=ints(0, 5, 9, 3, 10)), r"sorted non-decreasing, but t\[3\] = 3 < t\[2\] = 9"),
    (dict(x=ints(0, 70, 1, 80, 2)), r"2 of 5 events lie outside .* first at index 1: \(x, y\) = \(70, 0\)"),
    (dict(p=ints(0, 1, 2, 1, 0)), r"p\[2\] = 2"),
    (dict(p=ints(-1, 0, 1, 1, 1)), "mixes -1"),
    (dict(x=np.array([0.0, 1.5, 2.0, 3.0, 4.0])), "x must be an integer array, got torch.float64"),
    (dict(sensor_size=(48, 0)), r"sensor_size must be \(height, width\) positive ints"),
    (dict(clip="wrap"), "clip must be one of"),
]


@pytest.mark.parametrize("changes, message", STREAM_ERRORS)
def test_stream_bad_inputs(changes, message):
    arguments = dict(
        x=ints(0, 1, 2, 3, 4), y=ints(0, 0, 0, 0, 0), t=ints(0, 1, 2, 3, 4), p=ints(0, 1, 0, 1, 0)
    )
    arguments["sensor_size"] = SENSOR
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        EventStream(**arguments)


def test_stream_refuses_lists():
    with pytest.raises(TypeError, match="x must be a numpy array or torch tensor, got list"):
        EventStream([0, 1], ints(0, 1), ints(0, 1), ints(0, 1), SENSOR)


def test_slice_time_reversed_window():
    with pytest.raises(ValueError, match="t1_us must be >= t0_us"):
        random_stream(10, 1_000, seed=0).slice_time(500, 100)


def test_dsec_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*nowhere.h5"):
        DSECEventFile(tmp_path / "nowhere.h5")


def test_dsec_missing_datasets(tmp_path):
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("events/x", data=np.zeros(3, dtype=np.uint16))
        file.create_dataset("events/t", data=np.zeros(3, dtype=np.uint32))
    with pytest.raises(
        ValueError,
        match=r"partial.h5 is not a DSEC events file: missing .*'events/y', 'events/p', 'ms_to_idx'",
    ):
        DSECEventFile(path)


def test_dsec_unequal_datasets(tmp_path):
    path = tmp_path / "unequal.h5"
    with h5py.File(path, "w") as file:
        for name, length in (("x", 3), ("y", 3), ("t", 3), ("p", 2)):
            file.create_dataset(f"events/{name}", data=np.zeros(length, dtype=np.uint32))
        file.create_dataset("ms_to_idx", data=np.zeros(1, dtype=np.uint64))
    with pytest.raises(ValueError, match="must be 1-D and equally long"):
        DSECEventFile(path)


def test_dsec_bad_coordinates_name_the_file(tmp_path):
    path = tmp_path / "events.h5"
    write_dsec_h5(path, random_stream(100, 10_000, seed=12, sensor_size=(480, 640)))
    with (
        DSECEventFile(path, sensor_size=SENSOR) as events,
        pytest.raises(ValueError, match=r"events.h5, events \[0, \d+\): .*outside"),
    ):
        events.read(0, 10_000)


def test_dsec_read_reversed_window_and_closed_file(dsec_file):
    path, _ = dsec_file
    events = DSECEventFile(path, sensor_size=SENSOR)
    with pytest.raises(ValueError, match="t1_us must be >= t0_us"):
        events.read(10, 5)
    events.close()
    with pytest.raises(ValueError, match="is closed"):
        events.read(0, 10)


def test_dsec_without_h5py(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    with pytest.raises(ImportError, match="pip install h5py"):
        DSECEventFile(tmp_path / "events.h5")


def test_write_dsec_times_must_fit_uint32(tmp_path):
    stream = random_stream(10, 1_000, seed=13)
    with pytest.raises(ValueError, match=r"t - t_offset must lie in \[0, 2\*\*32\)"):
        write_dsec_h5(tmp_path / "events.h5", stream, t_offset=500)


def test_eventgpt_npy_bad_files(tmp_path):
    missing = tmp_path / "missing_p.npy"
    np.save(missing, {"x": ints(1), "y": ints(1), "t": ints(1)}, allow_pickle=True)
    with pytest.raises(ValueError, match=r"missing_p.npy is missing key\(s\) \['p'\]"):
        load_eventgpt_npy(missing)

    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="must hold a dict with keys"):
        load_eventgpt_npy(plain)

    fractional = tmp_path / "fractional.npy"
    np.save(
        fractional,
        {"x": ints(1, 2), "y": ints(1, 2), "t": np.array([1.0, 2.5]), "p": ints(0, 1)},
        allow_pickle=True,
    )
    with pytest.raises(ValueError, match=r"whole microseconds, got t\[1\] = 2.5"):
        load_eventgpt_npy(fractional)

    empty = tmp_path / "empty.npy"
    np.save(empty, {name: ints() for name in "xytp"}, allow_pickle=True)
    with pytest.raises(ValueError, match="holds no events; pass sensor_size"):
        load_eventgpt_npy(empty)

    unsorted = tmp_path / "unsorted.npy"
    np.save(unsorted, {"x": ints(1, 2), "y": ints(1, 2), "t": ints(5, 2), "p": ints(0, 1)}, allow_pickle=True)
    with pytest.raises(ValueError, match=r"unsorted.npy: EventStream: t must be sorted .* t\[1\] = 2"):
        load_eventgpt_npy(unsorted)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(height=0), "height must be a positive int, got 0"),
        (dict(events_per_second=-5.0), "events_per_second must be > 0 or None"),
        (dict(contrast_threshold=0.0), "contrast_threshold must be > 0 or None"),
        (dict(num_objects=-1), "num_objects must be an int >= 0"),
    ],
)
def test_synthetic_bad_arguments(changes, message):
    with pytest.raises(ValueError, match=message):
        synthetic_clip(**{**SMALL_CLIP, **changes})
