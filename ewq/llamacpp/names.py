"""GGUF tensor names of a Hugging Face model, as convert_hf_to_gguf.py gives them.

gguf-py's tensor-name map needs the GGUF architecture; it is found from the config's HF class,
or from its model_type where that is spelled as gguf's architecture name.
"""
from __future__ import annotations

import gguf

# HF architecture class -> GGUF architecture, for the names that differ from the model_type.
_ARCH_BY_CLASS = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
}


def gguf_arch(config: dict) -> gguf.MODEL_ARCH | None:
    for cls in config.get("architectures") or []:
        if cls in _ARCH_BY_CLASS:
            return _ARCH_BY_CLASS[cls]
    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    return by_name.get(config.get("model_type", ""))


class GGUFNamer:
    """Maps Hugging Face tensor names to the names convert_hf_to_gguf.py gives them."""

    def __init__(self, config: dict):
        arch = gguf_arch(config)
        n_blocks = int(config.get("num_hidden_layers", 0))
        self._map = gguf.get_tensor_name_map(arch, n_blocks) if arch is not None else None

    def __call__(self, hf_name: str) -> str | None:
        if self._map is None:
            return None
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        return name if name and name.endswith((".weight", ".bias")) else None
