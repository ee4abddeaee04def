"""crossspec_kernels: cross-modal speculative decoding kernels for video LLMs.

Importing the package needs neither a GPU nor the compiled extension: ``crossspec_kernels._C`` is
loaded lazily by the ops that use it (see ``crossspec_kernels._ext``). The ops themselves (and with
them torch) are imported on first use of a name below, so ``crossspec --help`` and other code that
only needs a submodule such as ``crossspec_kernels.cli`` do not pay for torch.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module it lives in.
_EXPORTS = {
    "VerifyOutput": "crossspec_kernels.reference",
    "adapter_lm_head_topk": "crossspec_kernels.ops",
    "compact_kv": "crossspec_kernels.ops",
    "events_to_frames": "crossspec_kernels.ops",
    "lm_head_topk": "crossspec_kernels.ops",
    "pack_tree_mask": "crossspec_kernels.ops",
    "tree_attention": "crossspec_kernels.ops",
    "verify": "crossspec_kernels.ops",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'crossspec_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
