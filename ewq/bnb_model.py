"""Applying a plan through bitsandbytes, and reading the quantized modules back.

Every nn.Linear whose weight the plan names becomes Linear8bitLt (int8, outlier threshold 6.0)
or Linear4bit (nf4, double-quantized absmax), or stays dense, per its precision. Embeddings
and MoE experts (3-D parameters in transformers, ewq.experts) cannot be bitsandbytes-quantized: a
plan that asks for it is recorded as not applicable, and they stay dense.
load_quantized() builds the model empty (parameters on the meta device) and fills it one checkpoint
tensor at a time, quantizing each planned matrix as it arrives: the full-precision model never
exists, so host RAM peaks near the quantized size plus the largest tensor or two (README, figures).
The model is returned in eval mode (bitsandbytes' int8 matmul takes another path in training mode).
The read-back inspects the modules actually in the model and fails on any mismatch (one line).
(Named so that it does not shadow `bnb`, the usual alias of bitsandbytes itself.)
"""
from __future__ import annotations

import torch
from torch import nn

from . import experts, weights
from .console import progress
from .errors import UserError
from .plan.entries import Plan
from .quant_types import INT8_OUTLIER_THRESHOLD, NF4_BLOCKSIZE, Precision
from .weights import ModelFiles
from .results.record import WeightsReport



def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as error:  # pragma: no cover - depends on the install
        raise UserError(f"bitsandbytes is not importable: {error}") from None
    return bnb


def _quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, precision: Precision,
                      compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes module holding `weight` [out, in] (quantized when moved to its device)."""
    bnb = _bnb()
    from accelerate import init_empty_weights

    weight = weight.to(torch.float16 if compute_dtype == torch.float16 else torch.float32)
    out_features, in_features = weight.shape
    with init_empty_weights():  # the constructors' own dense weights stay on the meta device
        if precision is Precision.INT8:
            module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None,
                                         has_fp16_weights=False, threshold=INT8_OUTLIER_THRESHOLD)
        else:
            module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                                       quant_type="nf4", compress_statistics=True)
    if precision is Precision.INT8:
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                          blocksize=NF4_BLOCKSIZE)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return module


def _set_module(model: nn.Module, module_name: str, module: nn.Module) -> None:
    parent_name, _, child_name = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)


def _planned_precision(plan: Plan, weight_name: str) -> Precision | None:
    """int8 / nf4 for a matrix the plan quantizes; None where it stays dense."""
    entry = plan.tensor(weight_name)
    return None if entry is None or entry.precision is Precision.FP16 else entry.precision


def _not_applicable(plan: Plan, linear_weights: set[str]) -> list[str]:
    return [entry.hf_name for entry in plan.tensors
            if entry.is_matrix and entry.precision is not Precision.FP16 and entry.hf_name not in linear_weights]


def load_quantized(files: ModelFiles, plan: Plan, device: str, compute_dtype: torch.dtype,
                   device_map: str | None = None) -> tuple[nn.Module, list[str]]:
    """The model with the plan applied, built tensor by tensor from the checkpoint: (model, the
    planned matrices that are not nn.Linear weights). Each tensor goes to `device`, or to its place
    in accelerate's `device_map` (auto, balanced, …: several GPUs, then CPU)."""
    from accelerate import dispatch_model

    model = _empty_model(files, compute_dtype)
    mapping = _device_map(model, device_map, plan) if device_map else None
    filler = _Filler(model, compute_dtype, lambda name: device if mapping is None else _place(mapping, name))
    tensors = weights.list_tensors(files)
    biases = {info.name: info for info in tensors if info.name.endswith(".bias")
              and info.name.removesuffix(".bias") in filler.linears}
    for info, tensor in progress(weights.read_tensors([t for t in tensors if t.name not in biases]),
                                 total=len(tensors) - len(biases), desc="load + quantize", unit="tensor"):
        module_name = info.name.removesuffix(".weight")
        precision = _planned_precision(plan, info.name) if module_name in filler.linears else None
        if precision is not None:
            bias_info = biases.get(f"{module_name}.bias")
            filler.quantized(module_name, tensor, next(weights.read_tensors([bias_info]))[1] if bias_info else None,
                             precision)
        else:
            filler.dense(info, tensor)
    filler.finish(biases)
    missing = filler.missing()
    if missing:
        raise UserError(f"the checkpoint of {files.root} lacks {len(missing)} parameter(s) of the model, "
                        f"e.g. {missing[0]}")
    if device_map and len(set(mapping.values())) > 1:  # layers on several GPUs: hooks move activations
        dispatch_model(model, device_map=mapping)
    return model.eval(), _not_applicable(plan, {f"{name}.weight" for name in filler.linears})


def _empty_model(files: ModelFiles, compute_dtype: torch.dtype) -> nn.Module:
    """The causal LM of the checkpoint's config, its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(files.root)
        with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
            return AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot build {files.root} as a causal LM: {str(error).splitlines()[0]}") from None


class _Filler:
    """Fills an empty model one checkpoint tensor at a time: a planned matrix as its bitsandbytes
    module, an expert's matrix into its place in a fused parameter (dense), anything else as it is."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype, placement):
        self.model, self.compute_dtype, self.placement = model, compute_dtype, placement
        self.linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        self.layout = experts.ModelTensors(model)
        self.fused_filled: dict[str, int] = {}  # MoE experts: fused parameter -> values written

    def quantized(self, module_name: str, weight: torch.Tensor, bias: torch.Tensor | None, precision: Precision):
        module = _quantized_linear(weight, bias, precision, self.compute_dtype).to(self.placement(f"{module_name}.weight"))
        _set_module(self.model, module_name, module)

    def dense(self, info, tensor: torch.Tensor) -> None:
        from accelerate.utils import set_module_tensor_to_device

        fused = self.layout.locate(info.name, info.shape) if experts.stack_name(info.name) else (info.name, ())
        if fused[1]:  # one expert's matrix, into its place in the fused parameter (stays dense)
            name, index = fused
            if name not in self.fused_filled:
                empty = torch.empty(self.model.get_parameter(name).shape, dtype=self.compute_dtype)
                set_module_tensor_to_device(self.model, name, self.placement(name), value=empty)
                self.fused_filled[name] = 0
            self.model.get_parameter(name).data[index].copy_(tensor)
            self.fused_filled[name] += tensor.numel()
            return
        try:
            value = tensor.to(self.compute_dtype) if tensor.is_floating_point() else tensor
            set_module_tensor_to_device(self.model, info.name, self.placement(info.name), value=value)
        except (AttributeError, ValueError, KeyError) as error:
            raise UserError(f"checkpoint tensor {info.name} has no place in {type(self.model).__name__} "
                            f"({error})") from None

    def finish(self, biases: dict) -> None:
        """The biases of the matrices that stayed dense, the buffers on their devices, tied weights."""
        from accelerate.utils import set_module_tensor_to_device

        for name, info in biases.items():
            if self.model.get_parameter(name).device.type == "meta":
                value = next(weights.read_tensors([info]))[1].to(self.compute_dtype)
                set_module_tensor_to_device(self.model, name, self.placement(name), value=value)
        for name, buffer in list(self.model.named_buffers()):  # rotary tables and the like, built on the host
            set_module_tensor_to_device(self.model, name, self.placement(name), value=buffer)
        self.model.tie_weights()

    def missing(self) -> list[str]:
        """Parameters still on the meta device, and fused parameters not wholly written."""
        out = [name for name, param in self.model.named_parameters() if param.device.type == "meta"]
        return out + [name for name, count in self.fused_filled.items()
                      if count != self.model.get_parameter(name).numel()]


def _device_map(model: nn.Module, device_map: str, plan: Plan, max_memory: dict | None = None) -> dict:
    """accelerate's module -> device map for `device_map`, sized by what each module will hold: a planned
    nf4 matrix half a byte per weight, int8 one, the rest at the compute dtype (sized from the dense model,
    the map would be 2-4x too large and spill layers off the GPUs). `auto` and `balanced` spread the
    layers evenly over the GPUs, as transformers' `auto` does; `sequential` fills them in order.
    bitsandbytes modules cannot be offloaded: a map that puts modules on the CPU beside GPUs, or on
    disk, is refused in one line (all on the CPU is a CPU run)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import CustomDtype, get_balanced_memory

    byte_size = {Precision.INT4: CustomDtype.INT4, Precision.INT8: torch.int8}
    special = {}
    for name, module in model.named_modules():
        precision = _planned_precision(plan, f"{name}.weight") if isinstance(module, nn.Linear) else None
        if precision is not None:
            special[f"{name}.weight"] = byte_size[precision]
    no_split = getattr(model, "_no_split_modules", None) or []
    if device_map != "sequential" and max_memory is None:
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split, special_dtypes=special,
                                         low_zero=device_map == "balanced_low_0")
    mapping = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                    special_dtypes=special)
    places = set(mapping.values())
    off = [name for name, where in mapping.items() if where in ("cpu", "disk")]
    if "disk" in places or (off and places - {"cpu", "disk"}):
        raise UserError(f"--device-map {device_map} puts {len(off)} module(s) on the CPU or disk beside the GPUs "
                        f"(e.g. {off[0]}): bitsandbytes modules cannot be offloaded; use more GPUs, a plan "
                        "with more 4-bit matrices, or --device cpu")
    return mapping


def _place(mapping: dict, name: str) -> str:
    """The device of the longest module prefix of `name` in the map (disk offload stays on the host)."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in mapping:
            where = mapping[key]
            return "cpu" if where == "disk" else (f"cuda:{where}" if isinstance(where, int) else str(where))
    raise UserError(f"the device map has no place for {name}")


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
