"""Original EventGPT checkpoint -> :class:`~crossspec_kernels.models.eventgpt.EventGPTForCausalLM`.

Key names of the original implementation (``EventChatModel(LlamaForCausalLM)`` whose ``model`` is a
``LlamaModel`` subclass carrying the event modules; read from its ``model/EventChatModel.py``)::

    original                                                ours
    model.embed_tokens.* / model.layers.* / model.norm.*    model.language_model.{same}
    lm_head.weight                                          lm_head.weight
    model.visual_tower.visual_tower.vision_model.<clip>     model.vision_tower.<clip>   (5.x CLIPVisionModel)
                                                            model.vision_tower.vision_model.<clip>  (4.57)
    model.visual_projector.0.{weight,bias}                  model.multi_modal_projector.linear_1.*
    model.visual_projector.2.{weight,bias}                  model.multi_modal_projector.linear_2.*
    model.feature_adaptor.{weight,bias}                     model.feature_adaptor.*

(``visual_tower.visual_tower`` is the original's ``VisualTower`` wrapper holding a CLIPVisionModel;
``visual_projector`` is ``nn.Sequential(Linear, GELU, Linear)``.) Buffers that older transformers
saved (``*.rotary_emb.inv_freq``, ``*.embeddings.position_ids``) are dropped. The optional event
Q-Former of the original (``model.query_embeddings``, ``model.query_embedder.*``,
``model.attention_layers.*``) has no counterpart here: such keys are reported as unexpected.

The original computes event features from CLIP's last hidden state with the CLS token and feeds
N per-frame means + 257 temporal means: build the config with
``eventgpt_config("7b")`` (the preset's default layout) to reproduce it.
"""

from __future__ import annotations

import functools
import glob
import os
import re

import torch

__all__ = [
    "ORIGINAL_IGNORED_SUFFIXES",
    "convert_eventgpt_state_dict",
    "load_original_checkpoint",
    "read_state_dict",
    "to_original_state_dict",
]

ORIGINAL_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
_ORIGINAL_VISION = "model.visual_tower.visual_tower."
_LIST_LIMIT = 12


@functools.cache
def _clip_inner_prefix() -> str:
    """ "vision_model." where CLIPVisionModel nests its transformer (4.57), "" where it is flat (5.x)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tiny = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=8,
        patch_size=8,
    )
    with torch.device("meta"):
        model = CLIPVisionModel(tiny)
    return "vision_model." if hasattr(model, "vision_model") else ""


def _rules() -> list[tuple[re.Pattern, str]]:
    clip = _clip_inner_prefix()
    return [
        (re.compile(r"^model\.(embed_tokens|layers|norm)\.(.+)$"), r"model.language_model.\1.\2"),
        (re.compile(r"^lm_head\.(.+)$"), r"lm_head.\1"),
        (
            re.compile(r"^model\.visual_tower\.visual_tower\.(?:vision_model\.)?(.+)$"),
            rf"model.vision_tower.{clip}\1",
        ),
        (
            re.compile(r"^model\.visual_projector\.0\.(weight|bias)$"),
            r"model.multi_modal_projector.linear_1.\1",
        ),
        (
            re.compile(r"^model\.visual_projector\.2\.(weight|bias)$"),
            r"model.multi_modal_projector.linear_2.\1",
        ),
        (re.compile(r"^model\.feature_adaptor\.(weight|bias)$"), r"model.feature_adaptor.\1"),
    ]


def _inverse_rules() -> list[tuple[re.Pattern, str]]:
    clip = re.escape(_clip_inner_prefix())
    return [
        (re.compile(r"^model\.language_model\.(.+)$"), r"model.\1"),
        (re.compile(r"^lm_head\.(.+)$"), r"lm_head.\1"),
        (
            re.compile(rf"^model\.vision_tower\.{clip}(.+)$"),
            r"model.visual_tower.visual_tower.vision_model.\1",
        ),
        (re.compile(r"^model\.multi_modal_projector\.linear_1\.(.+)$"), r"model.visual_projector.0.\1"),
        (re.compile(r"^model\.multi_modal_projector\.linear_2\.(.+)$"), r"model.visual_projector.2.\1"),
        (re.compile(r"^model\.feature_adaptor\.(.+)$"), r"model.feature_adaptor.\1"),
    ]


def _short(keys: list[str]) -> str:
    keys = sorted(keys)
    if len(keys) <= _LIST_LIMIT:
        return str(keys)
    return f"{keys[:_LIST_LIMIT]} ... ({len(keys)} in all)"


def _expected_keys(config) -> dict[str, torch.Size]:
    from crossspec_kernels.models.eventgpt import EventGPTForCausalLM

    with torch.device("meta"):
        model = EventGPTForCausalLM(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def convert_eventgpt_state_dict(original: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """Rename an original EventGPT state dict to this package's names (tensors are not copied).

    Raises ValueError listing the unexpected keys (names with no counterpart) and, when ``config`` (an
    EventGPTConfig) is given, the missing keys and shape mismatches against a model built from it.
    """
    if not isinstance(original, dict):
        raise ValueError(f"convert_eventgpt_state_dict: expected a dict, got {type(original).__name__}")
    rules = _rules()
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in original.items():
        if not isinstance(name, str):
            raise ValueError(f"convert_eventgpt_state_dict: keys must be strings, got {name!r}")
        if name.endswith(ORIGINAL_IGNORED_SUFFIXES):
            continue
        for pattern, replacement in rules:
            if pattern.match(name):
                converted[pattern.sub(replacement, name)] = tensor
                break
        else:
            unexpected.append(name)
    missing: list[str] = []
    mismatched: list[str] = []
    if config is not None:
        expected = _expected_keys(config)
        missing = [name for name in expected if name not in converted]
        unexpected += [name for name in converted if name not in expected]
        mismatched = [
            f"{name}: checkpoint {tuple(converted[name].shape)} vs config {tuple(expected[name])}"
            for name in expected
            if name in converted and tuple(converted[name].shape) != tuple(expected[name])
        ]
    if unexpected or missing or mismatched:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if mismatched:
            parts.append(f"shape mismatches {_short(mismatched)}")
        raise ValueError("convert_eventgpt_state_dict: " + "; ".join(parts))
    return converted


def to_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse renaming: this package's state dict -> original EventGPT key names."""
    rules = _inverse_rules()
    original: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        for pattern, replacement in rules:
            if pattern.match(name):
                original[pattern.sub(replacement, name)] = tensor
                break
        else:
            raise ValueError(f"to_original_state_dict: no original name for key {name!r}")
    return original


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or directory (``*.safetensors`` preferred, else ``*.bin``/``*.pt``)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            files = sorted(glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt")))
    else:
        raise FileNotFoundError(f"read_state_dict: {path!r} does not exist")
    if not files:
        raise FileNotFoundError(f"read_state_dict: no *.safetensors, *.bin or *.pt files in {path!r}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors.update(load_file(file, device="cpu"))
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise ValueError(f"read_state_dict: {file} does not hold a state dict")
            tensors.update(loaded)
    return tensors


def _vision_tower_as_original(vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPModel / CLIPVisionModel keys -> the original's tower names (text parts dropped)."""
    renamed = {}
    for name, tensor in vision.items():
        if name.startswith("vision_model."):
            name = name[len("vision_model.") :]
        elif name.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale")):
            continue
        renamed[f"{_ORIGINAL_VISION}vision_model.{name}"] = tensor
    return renamed


def load_original_checkpoint(
    cls,
    checkpoint,
    config,
    *,
    vision_tower_state_dict=None,
    dtype: torch.dtype | None = None,
):
    """``cls(config)`` with the converted weights of an original checkpoint (dict or path), strict.

    The model takes the checkpoint's floating dtype when it has a single one, unless ``dtype`` is given.
    """
    from crossspec_kernels.models.eventgpt import EventGPTConfig

    if not isinstance(config, EventGPTConfig):
        raise ValueError(
            f"from_original_checkpoint: config must be an EventGPTConfig, got {type(config).__name__}"
        )
    original = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint)
    if vision_tower_state_dict is not None:
        vision = (
            vision_tower_state_dict
            if isinstance(vision_tower_state_dict, dict)
            else read_state_dict(vision_tower_state_dict)
        )
        # The checkpoint's own tower wins where it has one.
        original = {**_vision_tower_as_original(vision), **original}
    converted = convert_eventgpt_state_dict(original, config)
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - present in 4.57 and 5.x
        no_init_weights = None
    if no_init_weights is not None:
        with no_init_weights():
            model = cls(config)
    else:  # pragma: no cover
        model = cls(config)
    if dtype is None:  # keep the checkpoint's precision (a 7B model in fp32 would need 28 GB)
        float_dtypes = {t.dtype for t in converted.values() if t.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None
    if dtype is not None:
        model.to(dtype=dtype)
    model.load_state_dict(converted, strict=True)
    return model.eval()
