"""MoE experts: one matrix per expert in a checkpoint, one tensor in a GGUF file and in a plan.

A checkpoint stores one matrix per expert and projection, `<prefix>.experts.<e>.<proj>.weight`
[out, in]. llama.cpp's converter stacks a block's experts into one GGUF tensor per projection
(`blk.N.ffn_gate_exps.weight`, [experts, out, in]), which takes one type, so a plan treats the
stack as one tensor: hf_name `<prefix>.experts.<proj>.weight` (the name the converter maps),
shape [experts, out, in], its members in expert order.
transformers (5.x) fuses a block's experts into 3-D parameters of its experts module, renaming
the module on the way for some models (Mixtral's block_sparse_moe is mlp): `gate_up_proj`
[experts, 2·ff, hidden] (the gate's rows first, then the up projection's) and `down_proj`
[experts, hidden, ff]. ModelTensors reads and writes a plan entry's values in a loaded model
wherever they live; a member it cannot place, or places with another shape, is a UserError.
"""
from __future__ import annotations

import re

import torch

from . import rearranged
from .errors import UserError
from .weights import block_index

_MEMBER = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")
# checkpoint projection -> (fused parameter of transformers' experts module, which part of its rows:
# 0 the first half, 1 the second, None all)
FUSED = {
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None),
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),  # Mixtral
}


def stack_name(name: str) -> str | None:
    """`…experts.<proj>.weight` for an expert's matrix `…experts.<e>.<proj>.weight`; None otherwise."""
    match = _MEMBER.match(name)
    return f"{match['prefix']}.{match['proj']}.weight" if match else None


def expert_index(name: str) -> int:
    return int(_MEMBER.match(name)["expert"])


def stacks(names: list[str]) -> dict[str, list[str]]:
    """stack name -> its members in expert order, for every expert matrix among `names`."""
    members: dict[str, list[str]] = {}
    for name in names:
        stack = stack_name(name)
        if stack is not None:
            members.setdefault(stack, []).append(name)
    for stack, names_of in members.items():
        names_of.sort(key=expert_index)
        if [expert_index(n) for n in names_of] != list(range(len(names_of))):
            raise UserError(f"the experts of {stack} are not numbered 0..{len(names_of) - 1}")
    return members


class ModelTensors:
    """A plan entry's values in a loaded model: its own parameter, its experts' places in the fused
    parameters of the experts module, or a part's elements in its source (`parts`: part name -> Part
    of the matrices the converter rearranges, rearranged.by_name / model_parts)."""

    def __init__(self, model: torch.nn.Module, parts: dict[str, rearranged.Part] | None = None):
        self.model, self.parts = model, parts or {}
        self._fused: dict[tuple[int, str], str] | None = None

    def locate(self, name: str, shape: tuple[int, ...]) -> tuple[str, tuple]:
        """(parameter name, index into it) of checkpoint tensor `name` of `shape`."""
        try:
            self.model.get_parameter(name)
            return name, ()
        except AttributeError:
            pass
        match, block = _MEMBER.match(name), block_index(name)
        if match is None or block is None or match["proj"] not in FUSED:
            raise UserError(f"checkpoint tensor {name} has no place in {type(self.model).__name__}")
        fused, part = FUSED[match["proj"]]
        param_name = self._fused_parameters().get((block, fused))
        if param_name is None:
            raise UserError(f"{type(self.model).__name__} has no fused experts parameter {fused} in block "
                            f"{block} for {name}")
        param = self.model.get_parameter(param_name)
        expert = int(match["expert"])
        rows = param.shape[1] if part is None else param.shape[1] // 2
        index = (expert,) if part is None else (expert, slice(part * rows, (part + 1) * rows))
        placed = tuple(param[index].shape)
        if placed != tuple(shape) or expert >= param.shape[0]:
            raise UserError(f"{name} {list(shape)} does not fit {param_name}{list(param.shape)} as this tool "
                            "expects (transformers' fused experts layout of this model is another)")
        return param_name, index

    def view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        param_name, index = self.locate(name, shape)
        return self.model.get_parameter(param_name).data[index]

    def values(self, entry) -> torch.Tensor:
        """A copy of the entry's values: [out, in], [experts, out, in] for a stack, or a part's as written."""
        if entry.source:
            part, source = self._part(entry)
            return part.of(source)
        if not entry.experts:
            return self.view(entry.hf_name, tuple(entry.shape)).clone()
        return torch.stack([self.view(member, tuple(entry.shape[1:])) for member in entry.experts])

    def assign(self, entry, values: torch.Tensor) -> None:
        """Write `values` (the shape of values()) into the model, cast to its dtype."""
        if entry.source:
            part, source = self._part(entry)
            part.put(source, values)
            return
        if not entry.experts:
            target = self.view(entry.hf_name, tuple(entry.shape))
            target.copy_(values.to(target.dtype))
            return
        for member, expert_values in zip(entry.experts, values):
            target = self.view(member, tuple(entry.shape[1:]))
            target.copy_(expert_values.to(target.dtype))

    def _part(self, entry) -> tuple[rearranged.Part, torch.Tensor]:
        """A part's index map (from the converter) and its source parameter."""
        part = self.parts.get(entry.hf_name)
        if part is None:
            raise UserError(f"{entry.hf_name}: llama.cpp's converter does not write this part of {entry.source} "
                            f"for the model in {self.model.name_or_path}")
        source = self.view(entry.source, part.source_shape)
        if not source.is_contiguous():
            raise UserError(f"{entry.source} is not contiguous in {type(self.model).__name__}")
        return part, source

    def _fused_parameters(self) -> dict[tuple[int, str], str]:
        """(block, fused name) -> parameter name, for every 3-D parameter of an `experts` module."""
        if self._fused is None:
            self._fused = {}
            for name, param in self.model.named_parameters():
                parts, block = name.split("."), block_index(name)
                if param.dim() == 3 and len(parts) > 2 and parts[-2] == "experts" and block is not None:
                    key = (block, parts[-1])
                    if key in self._fused:
                        raise UserError(f"{type(self.model).__name__} has two experts parameters {parts[-1]} in "
                                        f"block {key[0]}")
                    self._fused[key] = name
        return self._fused
