"""The speculative-decoding runtime: CrossSpecEngine and its draft configurations."""

from crossspec_kernels.runtime.controlled import ControlledAcceptance
from crossspec_kernels.runtime.draft_config import ChainDraft, TreeDraft
from crossspec_kernels.runtime.engine import CrossSpecEngine, GenerateOutput

__all__ = ["ChainDraft", "ControlledAcceptance", "CrossSpecEngine", "GenerateOutput", "TreeDraft"]
