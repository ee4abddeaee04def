"""SM partitioning of one GPU between the drafter and the target with CUDA green contexts.

A compute-bound target prefill fills every SM and the drafter's small decode kernels queue behind
it. A green context is a context provisioned with a fixed set of SMs; work on its streams runs only
on those SMs. Two complementary green contexts (drafter SMs, target SMs) let both run at once:

    partition = plan_partition(132, *partition_rules(9, 0), drafter_sms=16)
    with GreenContextStreams(partition, device) as gc:
        engine = CrossSpecEngine(..., streams=(gc.drafter_stream, gc.target_stream))

Facts this module relies on (checked against the sources named, not measured here):

- SM counts of a partition follow per-architecture rules; see ``partition_rules``.
- Work submitted in the *primary* context (any ordinary ``torch.cuda.Stream``) still runs on all
  SMs, including those provisioned to green contexts: a green context does not reserve its SMs.
  So both the drafter and the target must run on green-context streams for the split to hold.
  (Reported on the NVIDIA developer forums with %smid traces; not yet confirmed on our GPUs.)
- ``torch.cuda.green_contexts.GreenContext.create(num_sms=n)`` (torch 2.9-2.11,
  aten/src/ATen/cuda/CUDAGreenContext.cpp) splits one group of ``n`` SMs off the *whole* device
  each time and discards the remainder, so two torch green contexts are carved independently and
  may share SMs. ``GreenContext.Stream()`` (absent in 2.9) returns a ``torch.cuda.ExternalStream``
  over a non-blocking ``cuGreenCtxStreamCreate`` stream. Only the driver API gives complementary
  contexts (one split: the group for the drafter, its remainder for the target), so the driver
  backend is preferred whenever ``cuda.bindings`` is importable; torch is the fallback, with a
  warning.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_OP = "partition"

# Green contexts entered the driver API in CUDA 12.4 (driver API reference 12.4, section 6.35
# "Green Contexts"); torch's wrapper refuses drivers older than 12.8 (CUDAGreenContext.cpp).
_MIN_DRIVER_VERSION = {"driver": 12040, "torch": 12080}
_BACKENDS = ("driver", "torch")


# --------------------------------------------------------------------------------------------
# Planning (pure Python)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SMPartition:
    """SM counts of the drafter's and the target's green contexts on a device of ``total_sms``.

    Both counts are multiples of ``granularity`` and ``drafter_sms + target_sms <= total_sms``.
    """

    drafter_sms: int
    target_sms: int
    total_sms: int
    granularity: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"SMPartition: {field.name} must be a positive int, got {value!r}")
        for name in ("drafter_sms", "target_sms"):
            if getattr(self, name) % self.granularity:
                raise ValueError(
                    f"SMPartition: {name}={getattr(self, name)} is not a multiple of the "
                    f"granularity {self.granularity}"
                )
        if self.drafter_sms + self.target_sms > self.total_sms:
            raise ValueError(
                f"SMPartition: drafter_sms + target_sms = {self.drafter_sms + self.target_sms} "
                f"exceeds total_sms={self.total_sms}"
            )


def partition_rules(major: int, minor: int) -> tuple[int, int]:
    """(granularity, minimum) SM counts of a green-context partition on that compute capability.

    Source: CUDA Driver API reference, "Green Contexts" module (12.4 and 13.0 archives): "the
    partitions created have minimum SM count requirements, often rounding up and aligning the
    minCount provided to cuDevSmResourceSplitByCount". Its per-architecture guideline:
    6.X minimum 1 SM; 7.X minimum 2, multiple of 2; 8.X minimum 4, multiple of 2; 9.0 and newer
    (Hopper sm_90, Blackwell sm_100/sm_120) minimum 8, multiple of 8. The 13.x text adds that
    Tegra SoCs use a multiple of 2; 8 is also a multiple of 2, so the 9.0+ rule stays safe there.
    The driver reports the exact values per device (CUdevSmResource.minSmPartitionSize and
    smCoscheduledAlignment); this table is the documented guideline, used to plan before any
    context exists.
    """
    for name, value in (("major", major), ("minor", minor)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"partition_rules: {name} must be a non-negative int, got {value!r}")
    if major < 6:
        raise ValueError(
            f"partition_rules: green contexts need compute capability 6.0 or newer, got {major}.{minor}"
        )
    if major == 6:
        return 1, 1
    if major == 7:
        return 2, 2
    if major == 8:
        return 2, 4
    return 8, 8


def plan_partition(
    total_sms: int,
    granularity: int,
    minimum: int,
    *,
    drafter_sms: int | None = None,
    latency_by_sms: dict[int, float] | None = None,
    tolerance: float = 0.1,
) -> SMPartition:
    """Split ``total_sms`` between the drafter and the target.

    Exactly one of:
      drafter_sms: an explicit drafter share, rounded UP to the granularity (and to the minimum).
      latency_by_sms: measured drafter step latency (ms) per SM count; the drafter gets the
        smallest count whose latency is within ``(1 + tolerance)`` of the best measured one, so
        SMs that do not speed up the drafter go to the target.
    The target gets the complementary SMs, ``total_sms - drafter`` rounded DOWN to the granularity.
    """
    for name, value, low in (
        ("total_sms", total_sms, 1),
        ("granularity", granularity, 1),
        ("minimum", minimum, 1),
    ):
        if not _is_int(value) or value < low:
            raise ValueError(f"plan_partition: {name} must be a positive int, got {value!r}")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not math.isfinite(tolerance):
        raise ValueError(f"plan_partition: tolerance must be a finite number >= 0, got {tolerance!r}")
    if tolerance < 0:
        raise ValueError(f"plan_partition: tolerance must be a finite number >= 0, got {tolerance!r}")
    if (drafter_sms is None) == (latency_by_sms is None):
        raise ValueError("plan_partition: pass exactly one of drafter_sms or latency_by_sms")

    smallest = _round_up(minimum, granularity)
    largest_drafter = _round_down(total_sms - smallest, granularity)
    if largest_drafter < smallest:
        raise ValueError(
            f"plan_partition: total_sms={total_sms} cannot hold two partitions of at least "
            f"{smallest} SMs (granularity {granularity}, minimum {minimum})"
        )

    if drafter_sms is not None:
        if not _is_int(drafter_sms) or drafter_sms < 1:
            raise ValueError(f"plan_partition: drafter_sms must be a positive int, got {drafter_sms!r}")
        drafter = max(_round_up(drafter_sms, granularity), smallest)
        if drafter > largest_drafter:
            raise ValueError(
                f"plan_partition: drafter_sms={drafter_sms} (rounded up to {drafter}) leaves the target "
                f"fewer than {smallest} SMs; at most {largest_drafter} of total_sms={total_sms} fit"
            )
    else:
        drafter = _pick_from_latency(latency_by_sms, granularity, smallest, largest_drafter, tolerance)

    target = _round_down(total_sms - drafter, granularity)
    return SMPartition(drafter_sms=drafter, target_sms=target, total_sms=total_sms, granularity=granularity)


def _pick_from_latency(latency_by_sms, granularity, smallest, largest, tolerance) -> int:
    if not isinstance(latency_by_sms, dict) or not latency_by_sms:
        raise ValueError(
            f"plan_partition: latency_by_sms must be a non-empty dict {{sm_count: ms}}, got {latency_by_sms!r}"
        )
    for count, latency in latency_by_sms.items():
        if not _is_int(count) or count % granularity or not smallest <= count <= largest:
            raise ValueError(
                f"plan_partition: latency_by_sms has SM count {count!r}; counts must be multiples of "
                f"{granularity} in [{smallest}, {largest}]"
            )
        if (
            not isinstance(latency, (int, float))
            or isinstance(latency, bool)
            or not math.isfinite(latency)
            or latency <= 0
        ):
            raise ValueError(
                f"plan_partition: latency_by_sms[{count}] must be a finite positive time, got {latency!r}"
            )
    best = min(latency_by_sms.values())
    # The relative epsilon keeps a latency of exactly best * (1 + tolerance) inside the band.
    limit = best * (1.0 + tolerance) * (1.0 + 1e-12)
    return min(count for count, latency in latency_by_sms.items() if latency <= limit)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _round_down(value: int, multiple: int) -> int:
    return (value // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------
def _load_driver():
    """The cuda-python driver bindings module, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python layout
        except ImportError:
            return None
    return driver


def _torch_green_supported() -> bool:
    green = getattr(torch.cuda, "green_contexts", None)
    return bool(getattr(green, "SUPPORTED", False))


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    if _is_int(device):
        return torch.device("cuda", device)
    if isinstance(device, str):
        device = torch.device(device)
    if not isinstance(device, torch.device):
        raise ValueError(f"{_OP}: device must be a torch.device, an int or None, got {device!r}")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _device_info(index: int) -> tuple[int, tuple[int, int]]:
    """(SM count, compute capability) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, (props.major, props.minor)


def _driver_version() -> int | None:
    """The installed driver's CUDA version (e.g. 13000), or None when it cannot be read."""
    driver = _load_driver()
    if driver is not None:
        try:
            err, version = driver.cuDriverGetVersion()
            if err == driver.CUresult.CUDA_SUCCESS:
                return int(version)
        except Exception:  # any failure here: fall through to libcuda
            pass
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    except OSError:
        pass
    return None


def _available_backends() -> list[str]:
    backends = []
    if _load_driver() is not None:
        backends.append("driver")
    if _torch_green_supported():
        backends.append("torch")
    return backends


def green_contexts_available(device: torch.device | int | None = None) -> tuple[bool, str]:
    """(True, "") when green contexts can be made on ``device``, else (False, reason)."""
    ok, reason, _ = _availability(device, None)
    return ok, reason


def _availability(device, backend: str | None) -> tuple[bool, str, str | None]:
    """(ok, reason, chosen backend). ``backend`` None = driver if importable, else torch."""
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"{_OP}: backend must be None, 'driver' or 'torch', got {backend!r}")
    if not (device is None or _is_int(device) or isinstance(device, (str, torch.device))):
        raise ValueError(f"{_OP}: device must be a torch.device, an int or None, got {device!r}")
    if isinstance(device, (str, torch.device)) and torch.device(device).type != "cuda":
        return False, f"device {torch.device(device)} is not a CUDA device", None
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (CPU-only build)"
        return (
            False,
            f"CUDA is not available: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built with {built})",
            None,
        )
    resolved = _resolve_device(device)
    count = torch.cuda.device_count()
    if resolved.index >= count:
        return False, f"device {resolved} does not exist ({count} CUDA device(s))", None
    _, (major, minor) = _device_info(resolved.index)
    if major < 6:
        return False, f"compute capability {major}.{minor} is too old: green contexts need 6.0+", None

    backends = _available_backends()
    if not backends:
        return (
            False,
            "no green-context backend: torch was built without green contexts "
            "(torch.cuda.green_contexts.SUPPORTED is False) and cuda.bindings (cuda-python) is not installed",
            None,
        )
    if backend is not None and backend not in backends:
        why = (
            "cuda.bindings (cuda-python) is not installed"
            if backend == "driver"
            else "torch.cuda.green_contexts.SUPPORTED is False"
        )
        return False, f"backend {backend!r} is unavailable: {why}", None
    chosen = backend or backends[0]

    version = _driver_version()
    needed = _MIN_DRIVER_VERSION[chosen]
    if version is not None and version < needed:
        return (
            False,
            f"CUDA driver {_format_version(version)} is too old: the {chosen} green-context backend needs "
            f"{_format_version(needed)}+",
            None,
        )
    return True, "", chosen


def _format_version(version: int) -> str:
    return f"{version // 1000}.{(version % 1000) // 10}"


# --------------------------------------------------------------------------------------------
# Green contexts and their streams
# --------------------------------------------------------------------------------------------
def _check(driver, result, what: str):
    """Unpack a cuda-python result tuple (CUresult, *values), raising on an error code."""
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        name = str(err)
        try:
            name_err, raw = driver.cuGetErrorName(err)
            if name_err == driver.CUresult.CUDA_SUCCESS and raw:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
        except Exception:  # the error name is only decoration
            pass
        raise RuntimeError(f"{_OP}: {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _wrap_stream(handle: int, device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.ExternalStream(handle, device=device)


def _sync_stream(stream) -> None:
    stream.synchronize()


def _activate_primary_context(device: torch.device) -> None:
    # cuGreenCtxCreate retains the primary context; the driver docs advise having it active first
    # so that it is not created and torn down around each green context.
    torch.empty(1, device=device)


class _DriverGreenContexts:
    """Green contexts made with the driver API from one SM split, one stream in each.

    ``sm_counts`` are the requested counts, in order; the last one may be None, meaning "the
    remainder of the split" (every SM not given to an earlier group).
    """

    def __init__(self, device: torch.device, sm_counts: Sequence[int | None]):
        driver = _load_driver()
        self._driver = driver
        self._contexts: list = []
        self._handles: list = []
        self.streams: list[torch.cuda.Stream] = []
        self.actual_sms: list[int] = []
        try:
            self._create(driver, device, sm_counts)
        except BaseException:
            self.close()
            raise

    def _create(self, driver, device, sm_counts):
        _activate_primary_context(device)
        _check(driver, driver.cuInit(0), "cuInit")
        cu_device = _check(driver, driver.cuDeviceGet(device.index), "cuDeviceGet")
        whole = _check(
            driver,
            driver.cuDeviceGetDevResource(cu_device, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
            "cuDeviceGetDevResource",
        )
        resources = []
        first = sm_counts[0]
        groups, made, remainder = _check(
            driver, driver.cuDevSmResourceSplitByCount(1, whole, 0, first), "cuDevSmResourceSplitByCount"
        )
        if made != 1 or int(groups[0].sm.smCount) != first:
            got = int(groups[0].sm.smCount) if made else 0
            raise RuntimeError(
                f"{_OP}: cuDevSmResourceSplitByCount gave {made} group(s) of {got} SMs for a request of "
                f"{first}; the count must follow partition_rules for this device"
            )
        resources.append(groups[0])
        if len(sm_counts) == 2:
            if int(remainder.sm.smCount) < (sm_counts[1] or 1):
                raise RuntimeError(
                    f"{_OP}: the remainder of the split has {int(remainder.sm.smCount)} SMs, fewer than "
                    f"the {sm_counts[1]} requested"
                )
            resources.append(remainder)
        flags = driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
        for resource in resources:
            desc = _check(
                driver, driver.cuDevResourceGenerateDesc([resource], 1), "cuDevResourceGenerateDesc"
            )
            context = _check(driver, driver.cuGreenCtxCreate(desc, cu_device, flags), "cuGreenCtxCreate")
            self._contexts.append(context)
            handle = _check(
                driver,
                driver.cuGreenCtxStreamCreate(context, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
                "cuGreenCtxStreamCreate",
            )
            self._handles.append(handle)
            self.actual_sms.append(int(resource.sm.smCount))
            self.streams.append(_wrap_stream(int(handle), device))

    def close(self) -> None:
        driver = self._driver
        for stream in self.streams:
            _sync_stream(stream)
        # Streams before their contexts; errors while releasing are reported, not swallowed.
        errors = []
        for what, release, items in (
            ("cuStreamDestroy", "cuStreamDestroy", self._handles),
            ("cuGreenCtxDestroy", "cuGreenCtxDestroy", self._contexts),
        ):
            while items:
                item = items.pop()
                try:
                    _check(driver, getattr(driver, release)(item), what)
                except RuntimeError as error:
                    errors.append(str(error))
        self.streams = []
        if errors:
            raise RuntimeError("; ".join(errors))


class _TorchGreenContexts:
    """Green contexts made with torch.cuda.green_contexts, one stream in each."""

    def __init__(self, device: torch.device, sm_counts: Sequence[int]):
        from torch.cuda.green_contexts import GreenContext

        self._contexts = []
        self.streams: list[torch.cuda.Stream] = []
        self.actual_sms = list(sm_counts)
        for count in sm_counts:
            context = GreenContext.create(num_sms=count, device_id=device.index)
            self._contexts.append(context)
            if not hasattr(context, "Stream"):
                self.close()
                raise RuntimeError(
                    f"{_OP}: torch {torch.__version__}'s GreenContext has no Stream() (added after 2.9); "
                    "install cuda-python for the driver backend"
                )
            stream = context.Stream()
            if not isinstance(stream, torch.cuda.Stream):
                self.close()
                raise RuntimeError(
                    f"{_OP}: GreenContext.Stream() returned {type(stream).__name__}, not a torch.cuda.Stream"
                )
            self.streams.append(stream)

    def close(self) -> None:
        for stream in self.streams:
            _sync_stream(stream)
        # torch destroys a green context and its streams when the object is collected.
        self.streams = []
        self._contexts = []


def _make_contexts(backend: str, device: torch.device, sm_counts: Sequence[int | None]):
    if backend == "driver":
        return _DriverGreenContexts(device, sm_counts)
    return _TorchGreenContexts(device, sm_counts)


class GreenContextStreams:
    """Two complementary green contexts for an SMPartition and one stream in each.

        with GreenContextStreams(partition, device) as gc:
            engine = CrossSpecEngine(..., streams=(gc.drafter_stream, gc.target_stream))

    backend: None picks "driver" (cuda.bindings: one cuDevSmResourceSplitByCount; the drafter gets
    the group of ``partition.drafter_sms`` SMs and the target the whole remainder, so the two are
    disjoint and the target may get up to granularity - 1 SMs more than ``partition.target_sms``)
    when cuda-python is installed, else "torch" (torch.cuda.green_contexts; the two contexts are
    carved independently and may overlap, which is warned about).

    Attributes: drafter_stream, target_stream (torch.cuda.Stream on ``device``), partition, backend,
    device, actual_sms ((drafter, target) SM counts the contexts hold). close() / __exit__ waits for
    both streams and releases them; the streams must not be used afterwards.
    """

    def __init__(self, partition: SMPartition, device: torch.device | int | None = None, *, backend=None):
        if not isinstance(partition, SMPartition):
            raise ValueError(f"GreenContextStreams: partition must be an SMPartition, got {partition!r}")
        ok, reason, chosen = _availability(device, backend)
        if not ok:
            raise RuntimeError(f"GreenContextStreams: green contexts are unavailable: {reason}")
        self.device = _resolve_device(device)
        total, _ = _device_info(self.device.index)
        if partition.total_sms != total:
            raise ValueError(
                f"GreenContextStreams: partition was planned for total_sms={partition.total_sms}, "
                f"but {self.device} has {total} SMs"
            )
        if chosen == "torch":
            warnings.warn(
                "GreenContextStreams: torch.cuda.green_contexts carves each context from the whole "
                "device, so the drafter's and the target's SMs may overlap; install cuda-python for "
                "disjoint partitions",
                RuntimeWarning,
                stacklevel=2,
            )
        self.partition = partition
        self.backend = chosen
        sm_counts = [partition.drafter_sms, partition.target_sms]
        self._contexts = _make_contexts(chosen, self.device, sm_counts)
        self.drafter_stream, self.target_stream = self._contexts.streams
        self.actual_sms = tuple(self._contexts.actual_sms)
        self.closed = False

    def close(self) -> None:
        if getattr(self, "closed", True):
            return
        self.closed = True
        self._contexts.close()

    def __enter__(self) -> GreenContextStreams:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GreenContextStreams(backend={self.backend!r}, device={self.device}, "
            f"drafter_sms={self.actual_sms[0]}, target_sms={self.actual_sms[1]})"
        )


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def _time_step(step: Callable[[], None], stream, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``step`` enqueued on ``stream``, timed with CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
        for start, end in zip(starts, ends):
            start.record(stream)
            step()
            end.record(stream)
    stream.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def _check_measure_args(step, warmup, repeats) -> None:
    if not callable(step):
        raise ValueError(f"{_OP}: step must be a callable taking no arguments, got {step!r}")
    if not _is_int(warmup) or warmup < 0:
        raise ValueError(f"{_OP}: warmup must be an int >= 0, got {warmup!r}")
    if not _is_int(repeats) or repeats < 1:
        raise ValueError(f"{_OP}: repeats must be an int >= 1, got {repeats!r}")


def measure_drafter_latency(
    step: Callable[[], None],
    sm_counts: Sequence[int],
    device: torch.device | int | None,
    *,
    warmup: int = 3,
    repeats: int = 10,
    backend: str | None = None,
) -> dict[int, float]:
    """GPU only: median milliseconds of one drafter step on a green context of each SM count.

    ``step`` enqueues one drafter decode step on the current stream; it is run inside
    ``torch.cuda.stream(green_stream)`` after that stream waits for the caller's current stream.
    Each count must be a multiple of the device's granularity within [minimum, SM count].
    """
    _check_measure_args(step, warmup, repeats)
    if isinstance(sm_counts, (str, bytes)) or not isinstance(sm_counts, Sequence) or not sm_counts:
        raise ValueError(
            f"measure_drafter_latency: sm_counts must be a non-empty sequence of ints, got {sm_counts!r}"
        )
    for count in sm_counts:
        if not _is_int(count) or count < 1:
            raise ValueError(f"measure_drafter_latency: sm_counts must hold positive ints, got {count!r}")
    ok, reason, chosen = _availability(device, backend)
    if not ok:
        raise RuntimeError(f"measure_drafter_latency: green contexts are unavailable: {reason}")
    device = _resolve_device(device)
    total, capability = _device_info(device.index)
    granularity, minimum = partition_rules(*capability)
    for count in sm_counts:
        if count % granularity or count < minimum or count > total:
            raise ValueError(
                f"measure_drafter_latency: SM count {count} is not a multiple of {granularity} in "
                f"[{_round_up(minimum, granularity)}, {total}] (compute capability {capability[0]}.{capability[1]})"
            )

    caller_stream = torch.cuda.current_stream(device)
    latency: dict[int, float] = {}
    for count in dict.fromkeys(sm_counts):  # unique, in the given order
        contexts = _make_contexts(chosen, device, [count])
        try:
            stream = contexts.streams[0]
            stream.wait_stream(caller_stream)
            latency[count] = _time_step(step, stream, warmup, repeats)
        finally:
            contexts.close()
    return latency


def choose_partition(
    step: Callable[[], None],
    device: torch.device | int | None,
    *,
    candidates: Sequence[int] | None = None,
    tolerance: float = 0.1,
    warmup: int = 3,
    repeats: int = 10,
    backend: str | None = None,
) -> tuple[SMPartition, dict[int, float]]:
    """Measure the drafter step over candidate SM counts and plan the partition from it.

    candidates default to every granularity step from the minimum up to half the device's SMs.
    Returns (partition, {sm_count: median ms}).
    """
    _check_measure_args(step, warmup, repeats)
    ok, reason, _ = _availability(device, backend)
    if not ok:
        raise RuntimeError(f"choose_partition: green contexts are unavailable: {reason}")
    device = _resolve_device(device)
    total, capability = _device_info(device.index)
    granularity, minimum = partition_rules(*capability)
    if candidates is None:
        smallest = _round_up(minimum, granularity)
        candidates = list(range(smallest, max(smallest, total // 2) + 1, granularity))
    latency = measure_drafter_latency(
        step, candidates, device, warmup=warmup, repeats=repeats, backend=backend
    )
    partition = plan_partition(total, granularity, minimum, latency_by_sms=latency, tolerance=tolerance)
    return partition, latency
