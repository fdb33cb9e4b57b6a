"""The plan in llama-quantize's own terms: tensor_types_<hash>.txt, a file for its `--tensor-type-file`
(one `PATTERN=TYPE` per line; llama-quantize reads whitespace-separated tokens and allows no comments),
and quantize_command_<hash>.sh, the command that passes it.

llama-quantize's `--tensor-type PATTERN=TYPE` is an unanchored std::regex_search, so
`blk.1.` would also hit `blk.10.`; every pattern written here is anchored and escaped and
matches exactly one GGUF tensor name. Overrides only apply when the base type is quantized,
so the command uses a quantized base type and `--pure` (no built-in mix for unplanned tensors).
Matrices llama-quantize never quantizes (quant_types.never_quantized: MoE routers) get no override; the
plan holds them in F32, as the converter writes them.
llama.cpp replaces a type whose block does not divide a row (e.g. Q4_K on 576 columns) by a
fallback; the plan picks a compatible type itself so that the file read back equals the plan.
"""
from __future__ import annotations

import re
import shlex

from ..errors import UserError
from ..quant_types import BASE_TYPE, never_quantized


def anchored_pattern(gguf_name: str) -> str:
    return "^" + re.escape(gguf_name) + "$"


def tensor_types(plan) -> str:
    """The plan's overrides as a --tensor-type-file: every planned matrix gets its line (a matrix without
    a GGUF name is a UserError, not a file that would leave it on the base type)."""
    unnamed = [t.hf_name for t in plan.tensors if t.is_matrix and not t.gguf_name]
    if unnamed:
        raise UserError(f"plan {plan.plan_hash} has {len(unnamed)} matrices without a GGUF name (e.g. {unnamed[0]}): "
                        "no llama-quantize override can reach them")
    return "".join(f"{anchored_pattern(t.gguf_name)}={t.llama_type.lower()}\n" for t in plan.tensors
                   if t.gguf_name and t.is_matrix and not never_quantized(t.gguf_name))


def quantize_script(plan, types_file: str) -> str:
    """A bash script that turns an F16/F32 GGUF of the plan's model into the planned GGUF with the
    types file `types_file` (a name, looked up beside the script)."""
    quoted = shlex.quote(types_file)
    lines = [
        "#!/usr/bin/env bash",
        f"# EWQ plan {plan.plan_hash} for {plan.model_id} (model hash {plan.model_hash}).",
        f"# Applies the per-tensor plan with llama-quantize --tensor-type-file {types_file} (beside this script);",
        "# every pattern there is anchored to one tensor.",
        "# usage: $0 MODEL-F16.gguf OUTPUT.gguf [llama-quantize options, e.g. --imatrix FILE]",
        "# LLAMA_QUANTIZE may name the llama-quantize binary (default: llama-quantize on PATH).",
        "set -euo pipefail",
        'if [ $# -lt 2 ]; then echo "usage: $0 MODEL-F16.gguf OUTPUT.gguf [llama-quantize options]" >&2; exit 2; fi',
        f'types="$(cd "$(dirname "$0")" && pwd)"/{quoted}',
        'if [ ! -f "$types" ]; then echo "$0: $types is missing (it is written beside this script)" >&2; exit 2; fi',
        'input=$1; output=$2; shift 2',
        f'exec "${{LLAMA_QUANTIZE:-llama-quantize}}" --pure "$@" --tensor-type-file "$types" "$input" "$output" '
        f'{BASE_TYPE.name}',
        "",
    ]
    return "\n".join(lines)
