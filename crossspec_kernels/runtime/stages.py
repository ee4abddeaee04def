"""Per-stage timing and NVTX ranges for the engine.

Every stage is an NVTX range (on CUDA, for Nsight Systems), a ``record_function`` range (for the
torch profiler trace) and a pair of timestamps: CUDA events on the current stream, or
``time.perf_counter`` on CPU. Timestamps are read only in :meth:`StageTimer.totals`, after the
run, so timing adds no host sync to a round.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

STAGES = (
    "target.vision",
    "target.prefill",
    "draft.prefill",
    "draft.step",
    "verify.forward",
    "verify.accept",
    "kv.compact",
)


class StageTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._spans: dict[str, list[tuple[object, object]]] = defaultdict(list)

    def mark(self):
        """A timestamp: a CUDA event recorded on the current stream, or perf_counter seconds."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self, name: str):
        if self.cuda:
            torch.cuda.nvtx.range_push(name)
        profiler_range = torch.profiler.record_function(name)
        profiler_range.__enter__()
        return name, self.mark(), profiler_range

    def end(self, handle) -> None:
        name, start, profiler_range = handle
        self._spans[name].append((start, self.mark()))
        profiler_range.__exit__(None, None, None)
        if self.cuda:
            torch.cuda.nvtx.range_pop()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        handle = self.begin(name)
        try:
            yield
        finally:
            self.end(handle)

    def timed(self, name: str, fn):
        """``fn`` wrapped in :meth:`stage` ``name``: timing wraps a step without being woven into it."""

        def timed_fn(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed_fn

    def elapsed_ms(self, start, end) -> float:
        """Milliseconds between two :meth:`mark` timestamps (CUDA: call after synchronising)."""
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def totals(self) -> dict[str, float]:
        """Total milliseconds per stage (every known stage listed, 0.0 when it never ran)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = dict.fromkeys(STAGES, 0.0)
        for name, spans in self._spans.items():
            totals[name] = sum(self.elapsed_ms(start, end) for start, end in spans)
        return totals


class HostSeenMarks:
    """When the host first saw each draft step's mark done, in host time (``time.perf_counter``).

    With the drafter on its own device its CUDA events cannot be compared with the target's, so a
    free token is a draft whose step the host saw finished before the target's prefill ended (a CPU
    mark is its own host time; a CUDA event is stamped when ``query()`` first says it is done)."""

    def __init__(self) -> None:
        self._seen: dict[int, float] = {}

    def observe(self, marks) -> None:
        now = time.perf_counter()
        for index, mark in enumerate(marks):
            if index not in self._seen and (not isinstance(mark, torch.cuda.Event) or mark.query()):
                self._seen[index] = now if isinstance(mark, torch.cuda.Event) else mark

    def all_seen(self, marks) -> bool:
        return len(self._seen) >= len(marks)

    def count_before(self, marks, end: float) -> int:
        """How many of ``marks`` were seen done at or before host time ``end``."""
        return sum(self._seen.get(index, math.inf) <= end for index in range(len(marks)))
