import pytest
import torch

from conftest import tiny_llama
from ewq import bitsandbytes_plan as bnb
from ewq import weights
from ewq.errors import UserError
from ewq.plan import PlanParams, Precision
from ewq.plan.build import create_plan


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
