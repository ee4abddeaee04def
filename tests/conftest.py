"""Test setup shared by every test module.

Without a GPU, Triton kernels run in Triton's CPU interpreter. Triton decides between compiling
and interpreting when a kernel is decorated, so the variable must be set before any test imports
crossspec_kernels.triton; on a GPU machine the kernels are compiled for real.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
