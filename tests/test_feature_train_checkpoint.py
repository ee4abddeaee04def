"""Feature-head training resumes only from checkpoints that hold tensors and plain values."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crossspec_kernels.adapter_tools.feature_train import (
    CHECKPOINT_NAME,
    FeatureTrainConfig,
    train_feature_head,
)


class _CreatesFile:
    """A pickle payload: unpickling it calls open(path, "w"), so the file's existence tells whether it ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _tiny_target():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_feature_head_resume_refuses_a_planted_checkpoint(tmp_path):
    target = _tiny_target()
    corpus = [torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    config = FeatureTrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, rollout_steps=1)
    marker = tmp_path / "payload_ran"
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    checkpoint.parent.mkdir()
    torch.save({"step": 1, "head_config": _CreatesFile(marker)}, checkpoint)
    with pytest.raises(ValueError, match=r"train_feature_head: cannot resume from .*run/feature_head"):
        train_feature_head(
            target, corpus, config=config, checkpoint_dir=checkpoint.parent, show_progress=False
        )
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()
    # A checkpoint the function wrote itself resumes (weights_only=True accepts it).
    _, history = train_feature_head(
        target, corpus, config=config, checkpoint_dir=tmp_path / "ok", show_progress=False
    )
    _, resumed = train_feature_head(
        target, corpus, config=config, checkpoint_dir=tmp_path / "ok", show_progress=False
    )
    assert resumed == history and len(history) == 2
