"""What every Triton launcher shares: one lock around launches under Triton's CPU interpreter.

Triton's CPU interpreter (TRITON_INTERPRET=1) is not thread-safe. Each launch patches
``triton.language`` module-wide (its builtins are swapped for interpreter versions for the duration
of the launch, then restored) and keeps the program id being interpreted in one global builder. Two
threads launching at once, as the engine's ``overlap=True`` does (the drafter and the target run on
two threads), therefore corrupt each other: one launch finds ``tl`` already restored ("Did you
forget to add @triton.jit ?") or reads the other's grid ("x >= grid_dim[0]"). So under the
interpreter every launcher runs under one process-wide lock.

On a GPU kernels are compiled and launches share no such state: ``interpreter_serialized`` then
returns the launcher itself, so there is no cost at all. The choice is made when the launcher is
defined, as Triton makes its own (``triton.jit`` returns an interpreted function exactly when the
variable is set at decoration time).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# Reentrant, so a launcher that calls another launcher does not deadlock.
INTERPRETER_LOCK = threading.RLock()


def interpreter_active() -> bool:
    """True when Triton decorates kernels for its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton: the variable itself
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_serialized(launcher: F) -> F:
    """Decorator for a launcher: hold ``INTERPRETER_LOCK`` while it runs, under the interpreter only."""
    if not interpreter_active():
        return launcher

    @functools.wraps(launcher)
    def serialized(*args, **kwargs):
        with INTERPRETER_LOCK:
            return launcher(*args, **kwargs)

    return serialized
