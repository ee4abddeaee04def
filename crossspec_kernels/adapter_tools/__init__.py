"""Adapter toolchain: extract (drafter hidden, target next token) pairs, train adapters, evaluate them.

``crossspec adapter extract|train|eval`` wraps these functions; the Python API takes model objects.
The names below are imported on first use (they need torch), so the CLI's parser in
``adapter_tools.cli`` loads without torch.
"""

import importlib

# Public name -> the submodule it lives in.
_EXPORTS = {
    "GAMMAS": "evaluate",
    "ManifestError": "extract",
    "PairDataError": "extract",
    "Pairs": "data",
    "TrainConfig": "train",
    "evaluate_adapter": "evaluate",
    "extract_pairs": "extract",
    "format_table": "evaluate",
    "load_lm_head": "data",
    "load_pairs": "data",
    "read_manifest": "extract",
    "split_records": "data",
    "train_adapter": "train",
    "write_manifest": "extract",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
