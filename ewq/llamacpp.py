"""llama.cpp side of a plan: GGUF tensor names, ggml types, and the llama-quantize command.

llama-quantize's `--tensor-type PATTERN=TYPE` is an unanchored std::regex_search, so
`blk.1.` would also hit `blk.10.`; every pattern written here is anchored and escaped and
matches exactly one GGUF tensor name. Overrides only apply when the base type is quantized,
so the command uses a quantized base type and `--pure` (no built-in mix for unplanned tensors).
llama.cpp replaces a type whose block does not divide a row (e.g. Q4_K on 576 columns) by a
fallback; the plan picks a compatible type itself so that the file read back equals the plan.
"""
from __future__ import annotations

import re
import shlex

import gguf
from gguf import GGMLQuantizationType as GGMLType

from .errors import UserError

# HF architecture class -> GGUF architecture, for the names that differ from the model_type.
_ARCH_BY_CLASS = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
}
BASE_TYPE = GGMLType.Q8_0  # quantized, so that per-tensor overrides are honoured


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


def parse_type(name: str) -> GGMLType:
    try:
        return GGMLType[name.upper()]
    except KeyError:
        raise UserError(f"unknown llama.cpp tensor type '{name}'") from None


def bits_per_weight(ggml_type: GGMLType) -> float:
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return 8.0 * type_size / block_size


def fits_rows(ggml_type: GGMLType, ncols: int) -> bool:
    block_size, _ = gguf.GGML_QUANT_SIZES[ggml_type]
    return ncols % block_size == 0


def anchored_pattern(gguf_name: str) -> str:
    return "^" + re.escape(gguf_name) + "$"


def quantize_script(plan) -> str:
    """A bash script that turns an F16/F32 GGUF of the plan's model into the planned GGUF."""
    overrides = [
        f"--tensor-type {shlex.quote(anchored_pattern(t.gguf_name) + '=' + t.llama_type.lower())}"
        for t in plan.tensors
        if t.gguf_name and t.is_matrix
    ]
    lines = [
        "#!/usr/bin/env bash",
        f"# EWQ plan {plan.plan_hash} for {plan.model_id} (model hash {plan.model_hash}).",
        "# Applies the per-tensor plan with llama-quantize; every pattern is anchored to one tensor.",
        "# usage: $0 MODEL-F16.gguf OUTPUT.gguf [llama-quantize options, e.g. --imatrix FILE]",
        "# LLAMA_QUANTIZE may name the llama-quantize binary (default: llama-quantize on PATH).",
        "set -euo pipefail",
        'if [ $# -lt 2 ]; then echo "usage: $0 MODEL-F16.gguf OUTPUT.gguf [llama-quantize options]" >&2; exit 2; fi',
        'input=$1; output=$2; shift 2',
        'exec "${LLAMA_QUANTIZE:-llama-quantize}" --pure "$@" \\',
        *[f"  {override} \\" for override in overrides],
        f'  "$input" "$output" {BASE_TYPE.name}',
        "",
    ]
    return "\n".join(lines)
