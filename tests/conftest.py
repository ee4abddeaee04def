"""Test setup shared by every test module.

Without a GPU, Triton kernels run in Triton's CPU interpreter. Triton decides between compiling
and interpreting when a kernel is decorated, so the variable must be set before any test imports
crossspec_kernels.triton; on a GPU machine the kernels are compiled for real.
"""

import os

import pytest
import torch

from crossspec_kernels import testing_models as tm

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The engine tests' models and batch (test_engine, test_feature_engine, test_coupled_sampling).
# Module scope: the engine switches the attention of the model it is given, so ``target`` is
# rebuilt per module and ``reference_model`` (the one ``generate`` runs on) is never handed to it.
@pytest.fixture(scope="module")
def reference_model():
    return tm.tiny_video_llava(seed=0)


@pytest.fixture(scope="module")
def target():
    return tm.tiny_video_llava(seed=0)


@pytest.fixture(scope="module")
def batch_inputs():
    """Two left-padded video prompts of different lengths."""
    return tm.video_batch()
