"""Adapter toolchain: extract (drafter hidden, target next token) pairs, train adapters, evaluate them.

``crossspec adapter extract|train|eval`` wraps these functions; the Python API takes model objects.
"""

from crossspec_kernels.adapter_tools.data import Pairs, load_lm_head, load_pairs, split_records
from crossspec_kernels.adapter_tools.evaluate import GAMMAS, evaluate_adapter, format_table
from crossspec_kernels.adapter_tools.extract import (
    ManifestError,
    PairDataError,
    extract_pairs,
    read_manifest,
    write_manifest,
)
from crossspec_kernels.adapter_tools.train import TrainConfig, train_adapter

__all__ = [
    "GAMMAS",
    "ManifestError",
    "PairDataError",
    "Pairs",
    "TrainConfig",
    "evaluate_adapter",
    "extract_pairs",
    "format_table",
    "load_lm_head",
    "load_pairs",
    "read_manifest",
    "split_records",
    "train_adapter",
    "write_manifest",
]
