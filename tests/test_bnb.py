import pytest
import torch

from conftest import tiny_llama
from ewq import bnb_model as bnb
from ewq import weights
from ewq.errors import UserError
from ewq.plan import PlanParams
from ewq.quant_types import Precision
from ewq.plan.create import create_plan


@pytest.fixture
def model_and_plan(tmp_path):
    model = tiny_llama(num_layers=4, tie=True)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    plan = create_plan(str(tmp_path / "m"), PlanParams(entropy_factor=0.3, fp16_factor=0.8))
    return tmp_path / "m", plan


def test_apply_and_read_back_follow_the_plan(model_and_plan):
    from transformers import AutoModelForCausalLM

    path, plan = model_and_plan
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, not_applicable = bnb.load_quantized(weights.open_model(path), plan, "cpu", torch.float32)
    report = bnb.read_back(model, plan, not_applicable)
    assert not model.training and not any(m.training for m in model.modules())
    precisions = {p: 0 for p in Precision}
    for t in plan.tensors:
        if t.is_matrix and "embed" not in t.hf_name:
            module = model.get_submodule(t.hf_name.removesuffix(".weight"))
            assert bnb.module_precision(module) is t.precision
            precisions[t.precision] += 1
    assert precisions[Precision.INT4] and precisions[Precision.INT8] and precisions[Precision.FP16]
    by = report.details["linear_by_precision"]
    assert by["4bit"]["modules"] == precisions[Precision.INT4]
    assert 4.0 < by["4bit"]["bits_per_weight"] < 5.0  # small layers: the codebooks weigh more
    assert 8.0 < by["8bit"]["bits_per_weight"] < 8.6
    assert by["fp16"]["bits_per_weight"] == 32.0  # dense float32 on CPU
    assert report.weight_bytes < sum(p.numel() * 4 for p in dense.parameters())
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = dense(ids).logits, model(ids).logits
    relative = float((got - expected).norm() / expected.norm())
    assert 0 < relative < 0.2


def test_read_back_detects_a_module_that_differs_from_the_plan(model_and_plan):

    path, plan = model_and_plan
    model, not_applicable = bnb.load_quantized(weights.open_model(path), plan, "cpu", torch.float32)
    victim = next(t for t in plan.tensors if t.precision is Precision.INT4)
    parent_name, _, child = victim.hf_name.removesuffix(".weight").rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, torch.nn.Linear(old.in_features, old.out_features, bias=False))
    with pytest.raises(UserError, match="differ from the plan"):
        bnb.read_back(model, plan, not_applicable)


def test_moe_experts_are_loaded_into_the_fused_parameters_and_stay_dense(tmp_path):
    """Qwen3-MoE: each expert's checkpoint matrix goes to its place in transformers' fused 3-D parameters
    (bitsandbytes cannot hold those: recorded as not applicable); with every matrix dense the model is
    the one from_pretrained builds, to the bit; with the plan's int8/nf4 attention, close to it."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=128)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe", safe_serialization=True)
    files = weights.open_model(str(tmp_path / "moe"))
    plan = create_plan(str(tmp_path / "moe"), PlanParams(entropy_factor=0.3, fp16_factor=0.8))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))

    quantized, not_applicable = bnb.load_quantized(files, plan, "cpu", torch.float32)
    report = bnb.read_back(quantized, plan, not_applicable)
    assert sorted(not_applicable) == sorted(t.hf_name for t in plan.tensors if t.experts and t.precision is not Precision.FP16)
    assert report.details["linear_by_precision"]["4bit"]["modules"] + report.details["linear_by_precision"]["8bit"]["modules"]
    for name, param in dense.named_parameters():
        if name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name:
            assert torch.equal(quantized.get_parameter(name), param)

    for t in plan.tensors:
        t.precision = Precision.FP16
    all_dense, _ = bnb.load_quantized(files, plan, "cpu", torch.float32)
    with torch.inference_mode():
        expected, got, approx = dense(ids).logits, all_dense(ids).logits, quantized(ids).logits
    assert torch.equal(got, expected)
    assert 0 < float((approx - expected).norm() / expected.norm()) < 0.2


def test_the_device_map_is_sized_by_the_planned_precisions_and_refuses_offloading_them(model_and_plan):
    """Two GPUs given as accelerate's max_memory (no GPU needed to plan a map): every layer fits on them when
    its matrices are sized as nf4 (half a byte a weight), where sized as dense fp32 layers spill to the
    CPU, which bitsandbytes modules cannot be offloaded to: refused in one line."""
    import dataclasses

    path, plan = model_and_plan
    all_nf4 = dataclasses.replace(plan, tensors=[dataclasses.replace(t, precision=Precision.INT4)
                                                 if t.is_bnb_linear else t for t in plan.tensors])
    all_dense = dataclasses.replace(plan, tensors=[dataclasses.replace(t, precision=Precision.FP16)
                                                   for t in plan.tensors])
    model = bnb._empty_model(weights.open_model(path), torch.float32)
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    other_bytes = sum(p.numel() * 4 for p in model.parameters()) - linear_bytes
    per_gpu = (other_bytes + linear_bytes // 4) // 2 + 1  # the nf4-sized model (8x smaller linears) with room
    budget = {0: per_gpu, 1: per_gpu, "cpu": 10 * (other_bytes + linear_bytes)}
    mapping = bnb._device_map(model, "sequential", all_nf4, max_memory=budget)
    assert set(mapping.values()) <= {0, 1} and 1 in mapping.values()  # both GPUs, nothing on the CPU
    with pytest.raises(UserError, match="cannot be offloaded"):
        bnb._device_map(model, "sequential", all_dense, max_memory=budget)
