"""SM partitioning with green contexts: planning rules (CPU), availability and error paths (CPU),
the driver/torch backends against fakes (CPU), and real green contexts (@pytest.mark.gpu)."""

import itertools
import types

import pytest
import torch

from crossspec_kernels.runtime import partition as partition_mod
from crossspec_kernels.runtime.partition import (
    GreenContextStreams,
    SMPartition,
    choose_partition,
    green_contexts_available,
    measure_drafter_latency,
    partition_rules,
    plan_partition,
)

H100_SMS = 132


# --------------------------------------------------------------------------------------------
# partition_rules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "capability, rules",
    [
        ((6, 1), (1, 1)),
        ((7, 0), (2, 2)),
        ((7, 5), (2, 2)),
        ((8, 0), (2, 4)),
        ((8, 6), (2, 4)),
        ((8, 9), (2, 4)),
        ((9, 0), (8, 8)),
        ((10, 0), (8, 8)),
        ((12, 0), (8, 8)),
    ],
)
def test_partition_rules_follow_the_driver_guideline(capability, rules):
    assert partition_rules(*capability) == rules


@pytest.mark.parametrize(
    "major, minor, match",
    [
        (5, 2, "compute capability 6.0 or newer, got 5.2"),
        (-1, 0, "major must be a non-negative int"),
        (9, -1, "minor must be a non-negative int"),
        (9.0, 0, "major must be a non-negative int"),
        (True, 0, "major must be a non-negative int"),
    ],
)
def test_partition_rules_rejects_bad_capabilities(major, minor, match):
    with pytest.raises(ValueError, match=match):
        partition_rules(major, minor)


# --------------------------------------------------------------------------------------------
# plan_partition: explicit drafter_sms
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "requested, drafter, target",
    [
        (1, 8, 120),  # below the minimum: up to the minimum
        (8, 8, 120),
        (9, 16, 112),  # rounded UP to the granularity
        (16, 16, 112),
        (17, 24, 104),
        (64, 64, 64),  # 132 - 64 = 68 -> 64 for the target
        (120, 120, 8),  # the largest drafter that still leaves the target its minimum
    ],
)
def test_plan_explicit_rounds_up_and_gives_the_target_the_rest(requested, drafter, target):
    part = plan_partition(H100_SMS, 8, 8, drafter_sms=requested)
    assert part == SMPartition(drafter_sms=drafter, target_sms=target, total_sms=H100_SMS, granularity=8)


def test_plan_explicit_sm_80_granularity_two_minimum_four():
    # A100: 108 SMs, multiples of 2, at least 4.
    assert plan_partition(108, 2, 4, drafter_sms=3) == SMPartition(4, 104, 108, 2)
    assert plan_partition(108, 2, 4, drafter_sms=2) == SMPartition(4, 104, 108, 2)
    assert plan_partition(108, 2, 4, drafter_sms=11) == SMPartition(12, 96, 108, 2)
    assert plan_partition(108, 2, 4, drafter_sms=104) == SMPartition(104, 4, 108, 2)


@pytest.mark.parametrize(
    "total, granularity, minimum", [(132, 8, 8), (108, 2, 4), (114, 8, 8), (80, 2, 2), (28, 1, 1), (46, 8, 8)]
)
def test_plan_every_explicit_request_is_complementary(total, granularity, minimum):
    smallest = -(-minimum // granularity) * granularity
    accepted = 0
    for requested in range(1, total + 1):
        try:
            part = plan_partition(total, granularity, minimum, drafter_sms=requested)
        except ValueError as error:
            assert "drafter_sms" in str(error)
            # rejected only when the rounded request leaves the target below its minimum
            rounded = max(-(-requested // granularity) * granularity, smallest)
            assert (total - rounded) // granularity * granularity < smallest
            continue
        accepted += 1
        assert part.drafter_sms >= requested
        assert part.drafter_sms - requested < max(granularity, smallest)
        assert part.drafter_sms % granularity == 0 and part.target_sms % granularity == 0
        assert part.drafter_sms >= smallest and part.target_sms >= smallest
        assert part.drafter_sms + part.target_sms <= total
        # the target gets everything left, rounded down: less than one granule is idle
        assert total - part.drafter_sms - part.target_sms < granularity
    assert accepted > 0


# --------------------------------------------------------------------------------------------
# plan_partition: automatic choice from a latency curve
# --------------------------------------------------------------------------------------------
def _flattening_curve(counts, floor_ms=1.0, knee=32):
    """Latency that halves with SMs until ``knee`` SMs, then stays flat (memory bound)."""
    return {c: floor_ms * max(1.0, knee / c) for c in counts}


def test_plan_automatic_picks_the_knee_of_a_flattening_curve():
    curve = _flattening_curve(range(8, 65, 8), knee=32)
    assert curve[8] == 4.0 and curve[32] == 1.0 and curve[64] == 1.0
    part = plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.0)
    assert part == SMPartition(32, 96, H100_SMS, 8)


def test_plan_automatic_tolerance_trades_drafter_speed_for_target_sms():
    curve = {8: 3.0, 16: 1.5, 24: 1.15, 32: 1.05, 40: 1.0, 48: 1.0}
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.0).drafter_sms == 40
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.05).drafter_sms == 32
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.1).drafter_sms == 32
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.15).drafter_sms == 24
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.5).drafter_sms == 16
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=2.0).drafter_sms == 8


def test_plan_automatic_latency_exactly_on_the_tolerance_edge_is_inside():
    curve = {8: 1.1, 16: 1.0}
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.1).drafter_sms == 8
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.09).drafter_sms == 16


def test_plan_automatic_ties_go_to_the_fewest_sms():
    curve = {48: 2.0, 16: 2.0, 32: 2.0}
    part = plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.0)
    assert part == SMPartition(16, 112, H100_SMS, 8)


def test_plan_automatic_noisy_non_monotonic_curve():
    # Noise makes 24 SMs look slower than 16; the choice is still the smallest count in the band.
    curve = {8: 2.0, 16: 1.04, 24: 1.2, 32: 1.0, 40: 1.01}
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.05).drafter_sms == 16
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=0.02).drafter_sms == 32


def test_plan_automatic_single_measurement():
    assert plan_partition(H100_SMS, 8, 8, latency_by_sms={24: 0.7}) == SMPartition(24, 104, H100_SMS, 8)


def test_plan_automatic_is_complementary_on_random_curves():
    generator = torch.Generator().manual_seed(0)
    counts = list(range(8, 121, 8))
    for _ in range(50):
        values = (torch.rand(len(counts), generator=generator, dtype=torch.float64) + 0.1).tolist()
        curve = dict(zip(counts, values))
        tolerance = float(torch.rand((), generator=generator)) * 0.5
        part = plan_partition(H100_SMS, 8, 8, latency_by_sms=curve, tolerance=tolerance)
        best = min(values)
        assert curve[part.drafter_sms] <= best * (1 + tolerance) * (1 + 1e-12)
        assert all(curve[c] > best * (1 + tolerance) for c in counts if c < part.drafter_sms)
        assert part.target_sms == (H100_SMS - part.drafter_sms) // 8 * 8 >= 8


# --------------------------------------------------------------------------------------------
# plan_partition / SMPartition: bad inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 8, 8), dict(drafter_sms=8), "total_sms must be a positive int"),
        ((132.0, 8, 8), dict(drafter_sms=8), "total_sms must be a positive int"),
        ((132, 0, 8), dict(drafter_sms=8), "granularity must be a positive int"),
        ((132, 8, -8), dict(drafter_sms=8), "minimum must be a positive int"),
        ((12, 8, 8), dict(drafter_sms=8), "total_sms=12 cannot hold two partitions of at least 8"),
        ((132, 8, 8), dict(), "exactly one of drafter_sms or latency_by_sms"),
        ((132, 8, 8), dict(drafter_sms=8, latency_by_sms={8: 1.0}), "exactly one of drafter_sms"),
        ((132, 8, 8), dict(drafter_sms=0), "drafter_sms must be a positive int, got 0"),
        ((132, 8, 8), dict(drafter_sms=-16), "drafter_sms must be a positive int"),
        ((132, 8, 8), dict(drafter_sms=16.0), "drafter_sms must be a positive int"),
        ((132, 8, 8), dict(drafter_sms=True), "drafter_sms must be a positive int"),
        ((132, 8, 8), dict(drafter_sms=125), r"drafter_sms=125 \(rounded up to 128\).*at most 120"),
        ((132, 8, 8), dict(drafter_sms=132), r"drafter_sms=132 .*at most 120"),
        ((132, 8, 8), dict(drafter_sms=500), "drafter_sms=500"),
        ((132, 8, 8), dict(latency_by_sms={}), "latency_by_sms must be a non-empty dict"),
        ((132, 8, 8), dict(latency_by_sms=[(8, 1.0)]), "latency_by_sms must be a non-empty dict"),
        ((132, 8, 8), dict(latency_by_sms={12: 1.0}), "latency_by_sms has SM count 12"),
        ((132, 8, 8), dict(latency_by_sms={128: 1.0}), "latency_by_sms has SM count 128"),
        ((132, 8, 8), dict(latency_by_sms={0: 1.0}), "latency_by_sms has SM count 0"),
        ((132, 8, 8), dict(latency_by_sms={8: 0.0}), r"latency_by_sms\[8\] must be a finite positive"),
        ((132, 8, 8), dict(latency_by_sms={8: float("nan")}), r"latency_by_sms\[8\]"),
        ((132, 8, 8), dict(latency_by_sms={8: float("inf")}), r"latency_by_sms\[8\]"),
        ((132, 8, 8), dict(latency_by_sms={8: -1.0}), r"latency_by_sms\[8\]"),
        (
            (132, 8, 8),
            dict(latency_by_sms={8: 1.0}, tolerance=-0.1),
            "tolerance must be a finite number >= 0",
        ),
        ((132, 8, 8), dict(latency_by_sms={8: 1.0}, tolerance=float("nan")), "tolerance must be a finite"),
        ((132, 8, 8), dict(latency_by_sms={8: 1.0}, tolerance="0.1"), "tolerance must be a finite"),
    ],
)
def test_plan_partition_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_partition(*args, **kwargs)


@pytest.mark.parametrize(
    "fields, match",
    [
        ((0, 112, 132, 8), "drafter_sms must be a positive int"),
        ((16, 112, 132, 0), "granularity must be a positive int"),
        ((12, 112, 132, 8), "drafter_sms=12 is not a multiple of the granularity 8"),
        ((16, 116, 132, 8), "target_sms=116 is not a multiple"),
        ((24, 112, 132, 8), "drafter_sms \\+ target_sms = 136 exceeds total_sms=132"),
    ],
)
def test_sm_partition_checks_its_invariants(fields, match):
    with pytest.raises(ValueError, match=match):
        SMPartition(*fields)


def test_sm_partition_is_frozen_and_hashable():
    part = SMPartition(16, 112, 132, 8)
    with pytest.raises(AttributeError):
        part.drafter_sms = 8
    assert {part: 1}[SMPartition(16, 112, 132, 8)] == 1


# --------------------------------------------------------------------------------------------
# Availability on this machine, and branches of the check with CUDA faked
# --------------------------------------------------------------------------------------------
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


@needs_no_cuda
@pytest.mark.parametrize("device", [None, 0, torch.device("cuda", 0), "cuda"])
def test_available_is_false_without_cuda(device):
    ok, reason = green_contexts_available(device)
    assert ok is False
    assert "CUDA is not available" in reason and "torch.cuda.is_available() is False" in reason


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu"])
def test_available_is_false_for_a_cpu_device(device):
    ok, reason = green_contexts_available(device)
    assert ok is False and "is not a CUDA device" in reason


def test_available_rejects_a_nonsense_device():
    with pytest.raises(ValueError, match="device must be a torch.device, an int or None"):
        green_contexts_available(1.5)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A fake CUDA device 0 (an H100 unless a test changes ``state``) for the availability logic."""
    state = types.SimpleNamespace(
        capability=(9, 0), sms=H100_SMS, driver=None, torch_supported=False, driver_version=13000
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(partition_mod, "_device_info", lambda index: (state.sms, state.capability))
    monkeypatch.setattr(partition_mod, "_load_driver", lambda: state.driver)
    monkeypatch.setattr(partition_mod, "_torch_green_supported", lambda: state.torch_supported)
    monkeypatch.setattr(partition_mod, "_driver_version", lambda: state.driver_version)
    return state


def test_available_reports_an_old_compute_capability(fake_cuda):
    fake_cuda.capability = (5, 2)
    fake_cuda.torch_supported = True
    ok, reason = green_contexts_available(0)
    assert ok is False and "compute capability 5.2 is too old" in reason


def test_available_reports_a_missing_device(fake_cuda):
    ok, reason = green_contexts_available(3)
    assert ok is False and "cuda:3 does not exist (1 CUDA device(s))" in reason


def test_available_reports_no_backend(fake_cuda):
    ok, reason = green_contexts_available(None)
    assert ok is False
    assert "torch.cuda.green_contexts.SUPPORTED is False" in reason and "cuda.bindings" in reason


def test_available_reports_an_old_driver(fake_cuda):
    fake_cuda.torch_supported = True
    fake_cuda.driver_version = 12040  # enough for the driver API, not for torch's wrapper
    ok, reason = green_contexts_available(0)
    assert ok is False and "CUDA driver 12.4 is too old" in reason and "12.8+" in reason
    fake_cuda.driver = FakeDriver()
    assert green_contexts_available(0) == (True, "")  # the driver backend is picked and is new enough
    fake_cuda.driver_version = 12020
    ok, reason = green_contexts_available(0)
    assert ok is False and "driver 12.2 is too old" in reason


def test_available_with_either_backend(fake_cuda):
    fake_cuda.torch_supported = True
    assert green_contexts_available(0) == (True, "")
    fake_cuda.torch_supported, fake_cuda.driver = False, FakeDriver()
    assert green_contexts_available(torch.device("cuda", 0)) == (True, "")


# --------------------------------------------------------------------------------------------
# GreenContextStreams / measurement on a machine without green contexts
# --------------------------------------------------------------------------------------------
@needs_no_cuda
def test_green_context_streams_raise_with_the_reason_on_cpu():
    _, reason = green_contexts_available(None)
    with pytest.raises(RuntimeError, match="green contexts are unavailable: CUDA is not available") as info:
        GreenContextStreams(SMPartition(16, 112, 132, 8))
    assert reason in str(info.value)


def test_green_context_streams_reject_a_non_partition():
    with pytest.raises(ValueError, match="partition must be an SMPartition"):
        GreenContextStreams((16, 112))


def test_green_context_streams_reject_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be None, 'driver' or 'torch'"):
        GreenContextStreams(SMPartition(16, 112, 132, 8), backend="cuda")


def test_green_context_streams_raise_on_a_cpu_device():
    with pytest.raises(RuntimeError, match="cpu is not a CUDA device"):
        GreenContextStreams(SMPartition(16, 112, 132, 8), torch.device("cpu"))


@needs_no_cuda
def test_measurement_raises_clearly_on_cpu():
    with pytest.raises(RuntimeError, match="measure_drafter_latency: green contexts are unavailable: CUDA"):
        measure_drafter_latency(lambda: None, [8, 16], None)
    with pytest.raises(RuntimeError, match="choose_partition: green contexts are unavailable: CUDA"):
        choose_partition(lambda: None, None)


@pytest.mark.parametrize(
    "step, sm_counts, kwargs, match",
    [
        (None, [8], {}, "step must be a callable"),
        (lambda: None, [], {}, "sm_counts must be a non-empty sequence"),
        (lambda: None, 8, {}, "sm_counts must be a non-empty sequence"),
        (lambda: None, [8, 0], {}, "sm_counts must hold positive ints, got 0"),
        (lambda: None, [8.0], {}, "sm_counts must hold positive ints"),
        (lambda: None, [8], dict(repeats=0), "repeats must be an int >= 1"),
        (lambda: None, [8], dict(warmup=-1), "warmup must be an int >= 0"),
    ],
)
def test_measurement_rejects_bad_arguments(step, sm_counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_drafter_latency(step, sm_counts, None, **kwargs)


def test_choose_partition_rejects_bad_arguments():
    with pytest.raises(ValueError, match="step must be a callable"):
        choose_partition("step", None)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        choose_partition(lambda: None, None, repeats=0)


# --------------------------------------------------------------------------------------------
# The backends against fakes: what is created, split, wrapped and released
# --------------------------------------------------------------------------------------------
class FakeDriver:
    """Just enough of cuda.bindings.driver: results are (CUresult, *values) tuples."""

    class CUresult:
        CUDA_SUCCESS = 0
        CUDA_ERROR_INVALID_VALUE = 1

    class CUdevResourceType:
        CU_DEV_RESOURCE_TYPE_SM = "sm"

    class CUgreenCtxCreate_flags:
        CU_GREEN_CTX_DEFAULT_STREAM = 1

    class CUstream_flags:
        CU_STREAM_NON_BLOCKING = 1

    def __init__(self, total=H100_SMS, split_size=None, fail=None):
        self.total, self.split_size, self.fail = total, split_size, fail
        self.calls, self.live_contexts, self.live_streams = [], set(), set()
        self._ids = itertools.count(1000)

    @staticmethod
    def _resource(count):
        return types.SimpleNamespace(sm=types.SimpleNamespace(smCount=count))

    def _result(self, name, *values):
        self.calls.append(name)
        if self.fail == name:
            return (self.CUresult.CUDA_ERROR_INVALID_VALUE, *(None for _ in values))
        return (self.CUresult.CUDA_SUCCESS, *values)

    def cuGetErrorName(self, err):
        return self.CUresult.CUDA_SUCCESS, b"CUDA_ERROR_INVALID_VALUE"

    def cuDriverGetVersion(self):
        return self._result("cuDriverGetVersion", 13000)

    def cuInit(self, flags):
        return self._result("cuInit")

    def cuDeviceGet(self, ordinal):
        return self._result("cuDeviceGet", f"dev{ordinal}")

    def cuDeviceGetDevResource(self, device, kind):
        assert kind == "sm"
        return self._result("cuDeviceGetDevResource", self._resource(self.total))

    def cuDevSmResourceSplitByCount(self, groups, whole, flags, min_count):
        assert groups == 1 and flags == 0
        size = self.split_size or min_count
        self.split_request = min_count
        return self._result(
            "cuDevSmResourceSplitByCount", [self._resource(size)], 1, self._resource(whole.sm.smCount - size)
        )

    def cuDevResourceGenerateDesc(self, resources, count):
        assert count == len(resources) == 1
        return self._result("cuDevResourceGenerateDesc", ("desc", resources[0].sm.smCount))

    def cuGreenCtxCreate(self, desc, device, flags):
        context = ("ctx", desc[1], next(self._ids))
        result = self._result("cuGreenCtxCreate", context)
        if result[0] == self.CUresult.CUDA_SUCCESS:
            self.live_contexts.add(context)
        return result

    def cuGreenCtxStreamCreate(self, context, flags, priority):
        assert context in self.live_contexts and flags == 1
        handle = next(self._ids)
        result = self._result("cuGreenCtxStreamCreate", handle)
        if result[0] == self.CUresult.CUDA_SUCCESS:
            self.live_streams.add(handle)
        return result

    def cuStreamDestroy(self, handle):
        self.live_streams.remove(handle)
        return self._result("cuStreamDestroy")

    def cuGreenCtxDestroy(self, context):
        assert not self.live_streams, "a context was destroyed before its streams"
        self.live_contexts.remove(context)
        return self._result("cuGreenCtxDestroy")


class FakeStream:
    def __init__(self, handle, device):
        self.handle, self.device, self.synchronized = handle, device, 0

    def synchronize(self):
        self.synchronized += 1


@pytest.fixture
def fake_backends(fake_cuda, monkeypatch):
    monkeypatch.setattr(partition_mod, "_wrap_stream", FakeStream)
    monkeypatch.setattr(partition_mod, "_activate_primary_context", lambda device: None)
    return fake_cuda


def test_driver_backend_splits_once_and_gives_the_target_the_remainder(fake_backends):
    driver = fake_backends.driver = FakeDriver()
    part = plan_partition(H100_SMS, 8, 8, drafter_sms=16)
    with GreenContextStreams(part, 0) as gc:
        assert gc.backend == "driver" and gc.partition is part and gc.device == torch.device("cuda", 0)
        assert driver.calls.count("cuDevSmResourceSplitByCount") == 1 and driver.split_request == 16
        # drafter: the 16-SM group; target: every other SM (116 >= the planned 112), disjoint by construction
        assert gc.actual_sms == (16, 116)
        assert len(driver.live_contexts) == 2 and len(driver.live_streams) == 2
        assert {gc.drafter_stream.handle, gc.target_stream.handle} == driver.live_streams
        assert gc.drafter_stream.device == torch.device("cuda", 0)
        assert "drafter_sms=16, target_sms=116" in repr(gc)
    assert not driver.live_contexts and not driver.live_streams
    assert gc.drafter_stream.synchronized == 1 and gc.target_stream.synchronized == 1
    gc.close()  # idempotent
    assert driver.calls.count("cuGreenCtxDestroy") == 2


def test_driver_backend_refuses_a_split_of_the_wrong_size(fake_backends):
    driver = fake_backends.driver = FakeDriver(split_size=24)
    with pytest.raises(RuntimeError, match="gave 1 group\\(s\\) of 24 SMs for a request of 16"):
        GreenContextStreams(SMPartition(16, 112, H100_SMS, 8), 0)
    assert not driver.live_contexts and not driver.live_streams


@pytest.mark.parametrize(
    "failing", ["cuDevSmResourceSplitByCount", "cuGreenCtxCreate", "cuGreenCtxStreamCreate"]
)
def test_driver_backend_releases_everything_when_a_call_fails(fake_backends, failing):
    driver = fake_backends.driver = FakeDriver(fail=failing)
    with pytest.raises(RuntimeError, match=f"{failing} failed: CUDA_ERROR_INVALID_VALUE"):
        GreenContextStreams(SMPartition(16, 112, H100_SMS, 8), 0)
    assert not driver.live_contexts and not driver.live_streams


def test_green_context_streams_reject_a_partition_for_another_device(fake_backends):
    fake_backends.driver = FakeDriver()
    fake_backends.sms = 114  # an H100 PCIe
    with pytest.raises(ValueError, match="planned for total_sms=132, but cuda:0 has 114 SMs"):
        GreenContextStreams(SMPartition(16, 112, H100_SMS, 8), 0)


class FakeTorchGreenContext:
    created = []

    def __init__(self, num_sms, device_id):
        self.num_sms, self.device_id = num_sms, device_id

    @classmethod
    def create(cls, *, num_sms, device_id):
        context = cls(num_sms, device_id)
        cls.created.append(context)
        return context

    def Stream(self):
        return FakeStream(id(self), torch.device("cuda", self.device_id))


def test_torch_backend_warns_that_its_contexts_may_overlap(fake_backends, monkeypatch):
    import torch.cuda.green_contexts as green

    fake_backends.torch_supported = True
    FakeTorchGreenContext.created = []
    monkeypatch.setattr(green, "GreenContext", FakeTorchGreenContext)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)  # so the fake passes the stream type check
    with pytest.warns(RuntimeWarning, match="may overlap"):
        gc = GreenContextStreams(SMPartition(16, 112, H100_SMS, 8), 0)
    assert gc.backend == "torch" and gc.actual_sms == (16, 112)
    assert [(c.num_sms, c.device_id) for c in FakeTorchGreenContext.created] == [(16, 0), (112, 0)]
    gc.close()


def test_backend_request_for_a_missing_backend_is_refused(fake_backends):
    fake_backends.torch_supported = True
    with pytest.raises(RuntimeError, match="backend 'driver' is unavailable: cuda.bindings"):
        GreenContextStreams(SMPartition(16, 112, H100_SMS, 8), 0, backend="driver")


def test_measurement_makes_one_context_per_count_and_releases_it(fake_backends, monkeypatch):
    driver = fake_backends.driver = FakeDriver()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "caller")
    monkeypatch.setattr(FakeStream, "wait_stream", lambda self, other: waits.append(other), raising=False)
    timed, waits = [], []

    def fake_time(step, stream, warmup, repeats):
        # the green stream is ordered after the caller's stream (where the step's inputs were made)
        assert waits and waits.pop() == "caller"
        timed.append((driver.split_request, len(driver.live_contexts), warmup, repeats))
        return {8: 4.0, 16: 2.0, 24: 1.05, 32: 1.0}[driver.split_request]

    monkeypatch.setattr(partition_mod, "_time_step", fake_time)
    latency = measure_drafter_latency(lambda: None, [8, 16, 16, 24], 0, warmup=1, repeats=5)
    assert latency == {8: 4.0, 16: 2.0, 24: 1.05}
    assert timed == [(8, 1, 1, 5), (16, 1, 1, 5), (24, 1, 1, 5)]  # one live context at a time
    assert not driver.live_contexts and not driver.live_streams

    with pytest.raises(ValueError, match="SM count 12 is not a multiple of 8 in \\[8, 132\\]"):
        measure_drafter_latency(lambda: None, [12], 0)

    timed.clear()
    part, latency = choose_partition(lambda: None, 0, candidates=[8, 16, 24, 32], tolerance=0.1)
    assert part == SMPartition(24, 104, H100_SMS, 8) and latency[32] == 1.0
    with pytest.raises(KeyError):  # default candidates run up to half the SMs: 8, 16, ..., 64
        choose_partition(lambda: None, 0)
    assert [t[0] for t in timed][-1] == 40  # the first count the fake curve does not know


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
def _device_rules():
    props = torch.cuda.get_device_properties(0)
    granularity, minimum = partition_rules(props.major, props.minor)
    return props.multi_processor_count, granularity, minimum


@pytest.mark.gpu
def test_gpu_green_context_streams_run_kernels():
    total, granularity, minimum = _device_rules()
    ok, reason = green_contexts_available(0)
    assert ok, reason
    device = torch.device("cuda", 0)
    part = plan_partition(total, granularity, minimum, drafter_sms=16)
    a = torch.randn(256, 256, device=device)
    b = torch.randn(256, 256, device=device)
    expected = a @ b
    with GreenContextStreams(part, device) as gc:
        assert isinstance(gc.drafter_stream, torch.cuda.Stream)
        assert isinstance(gc.target_stream, torch.cuda.Stream)
        assert gc.drafter_stream.device == device and gc.target_stream.device == device
        assert gc.drafter_stream.cuda_stream != gc.target_stream.cuda_stream
        assert gc.actual_sms[0] == part.drafter_sms and gc.actual_sms[1] >= part.target_sms
        assert sum(gc.actual_sms) <= total
        results = []
        for stream in (gc.drafter_stream, gc.target_stream):
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                results.append(a @ b)
        torch.cuda.synchronize()
    for result in results:
        torch.testing.assert_close(result, expected)


@pytest.mark.gpu
def test_gpu_measurement_returns_positive_latencies_and_few_sms_are_slower():
    total, granularity, minimum = _device_rules()
    device = torch.device("cuda", 0)
    a = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    b = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    small = -(-minimum // granularity) * granularity
    large = total // 2 // granularity * granularity
    latency = measure_drafter_latency(lambda: a @ b, [small, large], device, warmup=2, repeats=5)
    assert set(latency) == {small, large}
    assert all(value > 0 for value in latency.values())
    # A compute-bound GEMM on `small` SMs must be clearly slower than on `large` SMs if the green
    # context really confines it (ideal ratio large / small: 8x on an H100).
    assert latency[small] > 2.0 * latency[large], latency
