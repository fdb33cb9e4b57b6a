"""Applying a plan through bitsandbytes, and reading the quantized modules back.

Every nn.Linear whose weight the plan names becomes Linear8bitLt (int8, outlier threshold 6.0)
or Linear4bit (nf4, double-quantized absmax), or stays dense, per its precision. Embeddings
cannot be bitsandbytes-quantized: a plan that asks for it is recorded as not applicable.
The read-back inspects the modules actually in the model and fails on any mismatch (one line).
(Named so that it does not shadow `bnb`, the usual alias of bitsandbytes itself.)
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .plan.model import Plan, Precision
from .results.record import WeightsReport

INT8_OUTLIER_THRESHOLD = 6.0
NF4_BLOCKSIZE = 64


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as error:  # pragma: no cover - depends on the install
        raise UserError(f"bitsandbytes is not importable: {error}") from None
    return bnb


def _quantized_linear(linear: nn.Linear, precision: Precision, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    has_bias = linear.bias is not None
    weight = linear.weight.data.to(torch.float16 if compute_dtype == torch.float16 else torch.float32)
    if precision is Precision.INT8:
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                     has_fp16_weights=False, threshold=INT8_OUTLIER_THRESHOLD)
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                   quant_type="nf4", compress_statistics=True)
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                          blocksize=NF4_BLOCKSIZE)
    if has_bias:
        module.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return module


def apply_plan(model: nn.Module, plan: Plan, device: str, compute_dtype: torch.dtype) -> dict:
    """Replace the planned nn.Linear modules in place, move the model to `device` (which
    quantizes the weights), and return what could not be applied."""
    not_applicable = []
    linear_weights = set()
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        weight_name = f"{module_name}.weight"
        linear_weights.add(weight_name)
        entry = plan.tensor(weight_name)
        if entry is None or entry.precision is Precision.FP16:
            continue
        parent_name, _, child_name = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, _quantized_linear(module, entry.precision, compute_dtype))
    for entry in plan.tensors:
        if entry.is_matrix and entry.precision is not Precision.FP16 and entry.hf_name not in linear_weights:
            not_applicable.append(entry.hf_name)
    model.to(device)
    return {"not_applicable": not_applicable}


def _tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else 0


def _quant_state_bytes(state) -> int:
    if state is None:
        return 0
    total = sum(_tensor_bytes(getattr(state, attr, None)) for attr in ("absmax", "code", "offset"))
    return total + _quant_state_bytes(getattr(state, "state2", None))


def module_precision(module: nn.Module) -> Precision | None:
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return Precision.INT4
    if isinstance(module, bnb.nn.Linear8bitLt):
        return Precision.INT8
    if isinstance(module, nn.Linear):
        return Precision.FP16
    return None


def _linear_weight_bytes(module: nn.Module, precision: Precision) -> int:
    weight = module.weight
    if precision is Precision.INT4:
        return _tensor_bytes(weight.data) + _quant_state_bytes(weight.quant_state)
    if precision is Precision.INT8:
        return _tensor_bytes(weight.data) + _tensor_bytes(getattr(weight, "SCB", None))
    return _tensor_bytes(weight.data)


def read_back(model: nn.Module, plan: Plan, not_applicable: list[str]) -> WeightsReport:
    """Inspect the loaded modules: real precision per planned matrix, bytes, bits per weight.
    A module whose precision differs from the plan is a UserError naming them."""
    seen_params: set[int] = set()
    total_bytes = total_weights = 0
    by_precision = {p.value: {"modules": 0, "weights": 0, "bytes": 0} for p in Precision}
    mismatches = []
    for module_name, module in model.named_modules():
        precision = module_precision(module)
        if precision is None:
            continue
        logical = module.in_features * module.out_features
        nbytes = _linear_weight_bytes(module, precision)
        if id(module.weight) not in seen_params:
            seen_params.add(id(module.weight))
            total_bytes += nbytes
            total_weights += logical
        if module.bias is not None and id(module.bias) not in seen_params:
            seen_params.add(id(module.bias))
            total_bytes += _tensor_bytes(module.bias.data)
            total_weights += module.bias.numel()
        slot = by_precision[precision.value]
        slot["modules"] += 1
        slot["weights"] += logical
        slot["bytes"] += nbytes
        entry = plan.tensor(f"{module_name}.weight")
        if entry is not None and entry.precision is not precision:
            mismatches.append(f"{module_name}: plan {entry.precision.value}, loaded {precision.value}")
    for name, param in model.named_parameters():
        if id(param) not in seen_params:  # embeddings, norms: dense
            seen_params.add(id(param))
            total_bytes += _tensor_bytes(param.data)
            total_weights += param.numel()
    if mismatches:
        raise UserError(f"bitsandbytes modules differ from the plan ({plan.plan_hash}): " + "; ".join(mismatches))
    for slot in by_precision.values():
        slot["bits_per_weight"] = 8 * slot["bytes"] / slot["weights"] if slot["weights"] else None
    return WeightsReport(weight_bytes=total_bytes, n_weights=total_weights,
                         details={"linear_by_precision": by_precision, "plan_not_applicable": not_applicable,
                                  "verified_against_plan": True})
