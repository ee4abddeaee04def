"""Lazy, cached loader of the compiled extension ``crossspec_kernels._C``.

Never imported when the package is imported: only ops that run the ``cuda`` backend (and
``crossspec info``) ask for the module, so the package works with no GPU and no built extension.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

MODULE_NAME = "crossspec_kernels._C"

BUILD_HINT = (
    "Build it from a source checkout with nvcc on PATH (or CUDA_HOME set): "
    "`pip install --no-build-isolation -e .` (needs pybind11, cmake and ninja installed; "
    "or plain `pip install .`). Pick GPU architectures with CROSSSPEC_CUDA_ARCHS "
    '(default "80;90a", e.g. CROSSSPEC_CUDA_ARCHS="90a" for H100/H200 only); '
    "MAX_JOBS limits parallel compile jobs."
)


@functools.cache
def get_module() -> ModuleType:
    """Import and return ``crossspec_kernels._C``; raise RuntimeError saying how to build it."""
    try:
        return importlib.import_module(MODULE_NAME)
    except ModuleNotFoundError as error:
        if error.name != MODULE_NAME:
            raise
        raise RuntimeError(
            "crossspec_kernels: the CUDA extension crossspec_kernels._C was not built (the package "
            "was installed without nvcc, or with CROSSSPEC_SKIP_CUDA=1), so backend='cuda' cannot "
            "run; the 'triton' and 'reference' backends still work. " + BUILD_HINT
        ) from error
    except ImportError as error:
        raise RuntimeError(
            f"crossspec_kernels: the CUDA extension crossspec_kernels._C exists but failed to load "
            f"({error}). Rebuild it for this Python and platform. " + BUILD_HINT
        ) from error


@functools.cache
def is_available() -> bool:
    """True when ``crossspec_kernels._C`` imports (says nothing about a GPU being present).

    Cached, failures included, because dispatch asks on every call for CUDA tensors.
    """
    try:
        get_module()
    except RuntimeError:
        return False
    return True


def clear_cache() -> None:
    """Forget the cached import result (tests that simulate a missing extension use this)."""
    get_module.cache_clear()
    is_available.cache_clear()
