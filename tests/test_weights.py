import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from ewq import weights
from ewq.errors import UserError
from ewq.plan import PlanParams
from ewq.plan.create import create_plan


def test_hash_is_stable_and_sees_weight_values(tiny_model_dir):
    files = weights.open_model(str(tiny_model_dir))
    first = weights.model_hash(files)
    assert first == weights.model_hash(weights.open_model(str(tiny_model_dir)))
    path = tiny_model_dir / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.3.mlp.up_proj.weight"
    tensors[name] = tensors[name] + 0.5  # same header, other values: a "fine-tune"
    save_file(tensors, path, metadata={"format": "pt"})
    assert weights.model_hash(weights.open_model(str(tiny_model_dir))) != first


def test_sharded_checkpoint_gives_the_same_tensors(tmp_path):
    model = tiny_llama(num_layers=4)
    model.save_pretrained(tmp_path / "one", safe_serialization=True)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="200KB")
    sharded = weights.open_model(str(tmp_path / "sharded"))
    assert len(sharded.weight_files) > 1 and (tmp_path / "sharded" / weights.INDEX_FILE).is_file()
    one = {t.name: t.shape for t in weights.list_tensors(weights.open_model(str(tmp_path / "one")))}
    assert {t.name: t.shape for t in weights.list_tensors(sharded)} == one
    plan_one = create_plan(str(tmp_path / "one"), PlanParams())
    plan_sharded = create_plan(str(tmp_path / "sharded"), PlanParams())
    assert [(t.hf_name, t.entropy_bits, t.precision) for t in plan_one.tensors] == \
           [(t.hf_name, t.entropy_bits, t.precision) for t in plan_sharded.tensors]


def test_iter_tensors_yields_real_values(tiny_model_dir):
    files = weights.open_model(str(tiny_model_dir))
    reference = load_file(tiny_model_dir / "model.safetensors")
    for info, tensor in weights.iter_tensors(weights.list_tensors(files)):
        assert torch.equal(tensor, reference[info.name])


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no config.json"),
    (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"]})), "not a causal LM"),
    (lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]})), "no safetensors"),
])
def test_bad_model_directories(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        weights.open_model(str(tmp_path))


def test_missing_model_path():
    with pytest.raises(UserError, match="model not found"):
        weights.open_model("/no/such/model")
