"""Plans a GGUF file must follow: names from llama.cpp's converter, no silent failure, and the kld score
end to end on tiny models (types and exact bytes read back from the quantized file)."""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_usage_error, run, tiny_llama
from ewq import assets
from ewq.data import wiki
from ewq.errors import UserError
from ewq.llamacpp import gguf_read
from ewq.llamacpp import tools as llama_tools
from ewq.processes import run_tool
from ewq.plan import PlanParams, Score
from ewq.plan.create import create_plan
from ewq.plan.files import write_plan

CALIBRATION = dict(calibration_windows=1, calibration_context=64)


def with_tokenizer(model, path: Path) -> Path:
    """Save a tiny model with SmolLM2's tokenizer (its vocabulary size), so that llama.cpp can convert it."""
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.save_pretrained(path, safe_serialization=True)
    return assets.copy_default_tokenizer(path)


def tiny_cohere(path: Path) -> Path:
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return with_tokenizer(CohereForCausalLM(config).eval(), path)


def quantize_and_read_back(plan, plan_dir: Path, model_dir: Path, tmp_path: Path) -> dict:
    _, script = write_plan(plan, plan_dir)
    f16 = llama_tools.convert_f16(model_dir, tmp_path / "f16.gguf")
    out = llama_tools.quantize_with_plan(script, f16, tmp_path / "planned.gguf", None)
    return {"check": gguf_read.verify_plan(plan, out), "file": out, "report": gguf_read.describe(out)}


def test_an_architecture_outside_the_old_table_is_planned_and_quantized_as_planned(tmp_path):
    """Cohere: model_type 'cohere', GGUF architecture 'command-r'; the old hand-written table named none of it."""
    model_dir = tiny_cohere(tmp_path / "cohere")
    plan = create_plan(str(model_dir), PlanParams(entropy_factor=0.3, fp16_factor=0.8))
    matrices = [t for t in plan.tensors if t.is_matrix]
    assert matrices and all(t.gguf_name for t in matrices)
    assert {t.gguf_name for t in matrices} >= {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"}
    assert len({t.llama_type for t in matrices}) >= 2
    read_back = quantize_and_read_back(plan, tmp_path / "plans", model_dir, tmp_path)
    assert read_back["check"]["matches_plan"] and read_back["check"]["tensors_checked"] == len(
        [t for t in plan.tensors if t.gguf_name])


def tiny_moe(path: Path, arch: str = "qwen3_moe") -> Path:
    """A tiny MoE model (4 experts, rows of 256 so that K-quants fit, tied embedding) with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=True)
    if arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        model = MixtralForCausalLM(MixtralConfig(intermediate_size=256, num_local_experts=4, **common))
    else:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=256, num_experts=4,
                                                   head_dim=64, **common))
    return with_tokenizer(model.eval(), path)


def test_moe_experts_are_planned_as_the_stacked_tensors_llama_cpp_writes(tmp_path):
    """Qwen3-MoE: the converter stacks each block's experts into one tensor per projection; the plan has
    one entry per stack (its members in expert order), keeps the router in F32 as llama.cpp does, and
    the quantized file follows it."""
    model_dir = tiny_moe(tmp_path / "moe")
    plan = create_plan(str(model_dir), PlanParams(entropy_factor=0.3, fp16_factor=0.8))
    stacks = [t for t in plan.tensors if t.experts]
    assert sorted(t.gguf_name for t in stacks) == sorted(f"blk.{b}.ffn_{p}_exps.weight" for b in (0, 1)
                                                         for p in ("gate", "up", "down"))
    gate = next(t for t in stacks if t.gguf_name == "blk.1.ffn_gate_exps.weight")
    assert gate.hf_name == "model.layers.1.mlp.experts.gate_proj.weight" and gate.shape == [4, 256, 256]
    assert gate.experts == [f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in range(4)]
    router = plan.tensor("model.layers.0.mlp.gate.weight")
    assert router.reason.value == "keep:llama.cpp" and router.llama_type == "F32"
    assert not any(".experts.0." in t.hf_name for t in plan.tensors)
    read_back = quantize_and_read_back(plan, tmp_path / "plans", model_dir, tmp_path)
    assert read_back["check"]["matches_plan"]
    in_file = {t.name: t for t in gguf_read.read_tensors(read_back["file"])}
    assert all(in_file[t.gguf_name].n_elements == t.numel for t in plan.tensors)


def test_a_kld_plan_of_an_moe_model_with_an_importance_matrix_is_the_file(tmp_path):
    """--score kld with llama-imatrix's per-expert importance: every stack measured (its experts swapped
    at once in transformers' fused parameters), bytes exact, and each stack in the file equal, bit for
    bit, to our round trip with each expert's own importance row."""
    import numpy as np
    from gguf import GGUFReader, quants

    from ewq.llamacpp.tools import calibration_file
    from ewq.llamacpp.quantizers import ImportanceMatrix, round_trip
    from ewq.plan.files import load_plan

    model_dir = tiny_moe(tmp_path / "moe")
    f16 = llama_tools.convert_f16(model_dir, tmp_path / "f16.gguf")
    imatrix_file = llama_tools.build_imatrix(f16, calibration_file(tmp_path), tmp_path / "imatrix.gguf", 64, 4)
    imatrix = ImportanceMatrix.load(imatrix_file)
    assert imatrix.for_tensor("blk.0.ffn_down_exps.weight").shape == (4, 256)
    budget, plans = 26_600_000, tmp_path / "plans"  # the embedding kept in F16 (25.2 MB), the rest about 5.6 bpw
    result = run("create_quantization_plan.py", "--model", model_dir, "--target-size", str(budget), "--score", "kld",
                 "--imatrix", imatrix_file, "--calibration-windows", "1",
                 "--calibration-context", "64", "--out-dir", plans)
    plan = load_plan(Path(result.stdout.split()[0]))
    stacks = [t for t in plan.tensors if t.experts]
    assert len(stacks) == 6 and all(t.rank_score and t.rank_score > 0 for t in stacks)
    assert len({t.llama_type for t in stacks}) >= 2
    assert plan.budget.gguf.bytes <= budget and len({t.llama_type for t in plan.tensors if t.is_matrix}) >= 2
    _, script = write_plan(plan, plans)
    out = llama_tools.quantize_with_plan(script, f16, tmp_path / "planned.gguf", imatrix_file)
    assert gguf_read.verify_plan(plan, out)["matches_plan"]
    assert gguf_read.describe(out).weight_bytes == plan.budget.gguf.bytes
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        in_file = {t.name: t for t in GGUFReader(out).tensors}
        for stack in stacks:
            values = torch.stack([weights.get_tensor(m) for m in stack.experts]).float().numpy()
            tensor = in_file[stack.gguf_name]
            written = quants.dequantize(tensor.data, tensor.tensor_type).reshape(values.shape)
            expected = round_trip(values.astype(np.float16).astype(np.float32), stack.llama_type,
                                  imatrix.for_tensor(stack.gguf_name))
            assert np.array_equal(written, expected), stack.gguf_name


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_every_expert_is_found_in_transformers_fused_parameters(tmp_path, arch):
    """transformers fuses the experts (gate and up concatenated; Mixtral's module renamed): ModelTensors
    reads each checkpoint matrix back from its place, and writes a stack back where it came from."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from ewq.experts import ModelTensors

    model_dir = tiny_moe(tmp_path / arch, arch)
    plan = create_plan(str(model_dir), PlanParams())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tensors = ModelTensors(model)
    stacks = [t for t in plan.tensors if t.experts]
    assert len(stacks) == 6
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        for stack in stacks:
            assert torch.equal(tensors.values(stack), torch.stack([weights.get_tensor(m).float() for m in stack.experts]))
    before = {name: p.clone() for name, p in model.named_parameters()}
    stack = stacks[0]
    tensors.assign(stack, torch.zeros(stack.shape))
    assert not tensors.values(stack).any()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == 1 and changed[0].endswith(("gate_up_proj", "down_proj"))


def test_an_architecture_the_converter_does_not_know_is_refused(tmp_path):
    model = tmp_path / "unknown"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["FrobnicatorForCausalLM"], "num_hidden_layers": 1}))
    save_file({"model.layers.0.proj.weight": torch.zeros(8, 8)}, str(model / "model.safetensors"))
    with pytest.raises(UserError, match="converter does not know"):
        create_plan(str(model), PlanParams())


def without_index_maps(monkeypatch):
    """The naming as if the converter computed every rearranged tensor anew (no index maps)."""
    from ewq.plan import create as build

    real = build.gguf_names

    def stripped(model_dir, config, names):
        naming = real(model_dir, config, names)
        written = {hf: [output._replace(index=None) for output in outputs] for hf, outputs in naming.written.items()}
        return dataclasses.replace(naming, written=written)

    monkeypatch.setattr(build, "gguf_names", stripped)


def fused_checkpoint(per_expert: Path, path: Path) -> Path:
    """The same model with each block's experts fused as transformers 5 holds them: gate_up_proj
    [experts, 2·ff, hidden] (the gates' rows first), down_proj [experts, hidden, ff]."""
    from ewq import experts

    shutil.copytree(per_expert, path)
    tensors = load_file(path / "model.safetensors")
    for stack, members in experts.stacks(list(tensors)).items():
        prefix, proj = stack.removesuffix(".weight").rsplit(".", 1)
        stacked = torch.stack([tensors.pop(member) for member in members])
        tensors[f"{prefix}.{proj}"] = stacked
    for prefix in {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".gate_proj")}:
        tensors[f"{prefix}.gate_up_proj"] = torch.cat([tensors.pop(f"{prefix}.gate_proj"),
                                                      tensors.pop(f"{prefix}.up_proj")], dim=1)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_experts_fused_in_the_checkpoint_are_planned_as_the_converter_splits_them(tmp_path, monkeypatch):
    """Qwen3-MoE with its experts fused in the checkpoint: the converter splits gate_up_proj into
    ffn_gate_exps and ffn_up_exps; the plan follows (parts, ewq.rearranged) and equals, tensor for tensor,
    the plan of the same weights stored one matrix per expert."""
    per_expert = tiny_moe(tmp_path / "per-expert")
    fused = fused_checkpoint(per_expert, tmp_path / "fused")
    params = PlanParams(entropy_factor=0.3, fp16_factor=0.8)
    reference = {t.gguf_name: t for t in create_plan(str(per_expert), params).tensors}
    plan = create_plan(str(fused), params)
    parts = [t for t in plan.tensors if t.source]
    assert len(parts) == 6 and {t.source.rsplit(".", 1)[-1] for t in parts} == {"gate_up_proj", "down_proj"}
    for t in plan.tensors:
        twin = reference[t.gguf_name]
        assert (t.shape, t.numel, t.llama_type, t.entropy_bits) == (twin.shape, twin.numel, twin.llama_type,
                                                                    twin.entropy_bits), t.gguf_name
    read_back = quantize_and_read_back(plan, tmp_path / "plans", fused, tmp_path)
    assert read_back["check"]["matches_plan"] and read_back["check"]["tensors_checked"] == len(plan.tensors)
    without_index_maps(monkeypatch)
    with pytest.raises(UserError, match=r"already fused \(model.layers.0.mlp.experts.down_proj, \[4, 256, 256\]\)"):
        create_plan(str(fused), params)


def assert_parts_are_what_the_converter_writes(plan, model_dir: Path, f16: Path) -> None:
    """Every part's values, picked from the checkpoint by its index map, equal the converter's F16 file."""
    from gguf import GGUFReader

    from ewq import rearranged

    written = {t.name: np.asarray(t.data) for t in GGUFReader(f16).tensors}
    checkpoint = load_file(model_dir / "model.safetensors")
    index = rearranged.model_parts(str(model_dir))
    parts = [t for t in plan.tensors if t.source and t.is_matrix]
    assert parts
    for t in parts:
        values = index[t.hf_name].of(checkpoint[t.source])
        assert list(values.shape) == t.shape and np.array_equal(values.half().numpy(), written[t.gguf_name]), t.hf_name


def tiny_gpt_oss(path: Path) -> Path:
    """GPT-OSS in bf16 layout: 2 blocks of 4 experts, hidden 64."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=256)
    return with_tokenizer(GptOssForCausalLM(config).eval(), path)


def test_gpt_oss_experts_fused_and_interleaved_are_planned_as_written(tmp_path):
    """GPT-OSS in bf16: gate_up_proj [experts, hidden, 2·ff] with gate and up interleaved column by column,
    which the converter transposes and splits into ffn_gate_exps / ffn_up_exps; its per-expert biases
    ([experts, out], 2-D) stay vectors in F32."""
    model_dir = tiny_gpt_oss(tmp_path / "oss")
    plan = create_plan(str(model_dir), PlanParams(entropy_factor=0.3, fp16_factor=0.8))
    matrices = {t.gguf_name: t for t in plan.tensors if t.source and t.is_matrix}
    assert sorted(matrices) == [f"blk.{b}.ffn_{kind}_exps.weight" for b in (0, 1) for kind in ("down", "gate", "up")]
    assert all(t.shape == [4, 64, 64] for t in matrices.values())
    biases = [t for t in plan.tensors if "proj_bias" in t.hf_name]
    assert biases and all(not t.is_matrix and t.llama_type.value == "F32" for t in biases)
    read_back = quantize_and_read_back(plan, tmp_path / "plans", model_dir, tmp_path)
    assert read_back["check"]["matches_plan"] and read_back["check"]["tensors_checked"] == len(
        [t for t in plan.tensors if t.gguf_name])
    assert_parts_are_what_the_converter_writes(plan, model_dir, tmp_path / "f16.gguf")


def test_experts_stored_in_mxfp4_are_refused_not_left_out(tmp_path):
    """GPT-OSS as released: experts in MXFP4 (uint8 blocks and scales, quantization_config mxfp4). A plan
    reads floats only; before, these matrices were left out of it and the plan claimed its budget."""
    model_dir = tiny_gpt_oss(tmp_path / "oss")
    tensors = load_file(model_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, rows = tensors.pop(name).shape[0], 128 if name.endswith("gate_up_proj") else 64
        tensors[f"{name}_blocks"] = torch.randint(0, 256, (experts, rows, 2, 16), dtype=torch.uint8)
        tensors[f"{name}_scales"] = torch.randint(120, 130, (experts, rows, 2), dtype=torch.uint8)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config_file = model_dir / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "quantization_config": {"quant_method": "mxfp4"}}))
    result = run("create_quantization_plan.py", "--model", model_dir, "--out-dir", tmp_path / "plans", check=False)
    assert_usage_error(result, "8 tensors of")
    assert re.search(r"stored quantized \(quant_method mxfp4; e\.g\. model\.layers\.\d\.mlp\.experts\."
                     r"(gate_up|down)_proj_(blocks|scales) U8", result.stderr), result.stderr
    assert not (tmp_path / "plans").exists() or not any((tmp_path / "plans").iterdir())


def tiny_deepseek(path: Path) -> Path:
    """DeepSeek-V3 (MLA: kv_b_proj per head; MoE in its second block), rows of 32 and 64."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=64,
                              kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=1,
                              topk_group=1, max_position_embeddings=256, tie_word_embeddings=True)
    return with_tokenizer(DeepseekV3ForCausalLM(config).eval(), path)


def test_a_matrix_the_converter_splits_is_planned_as_written_and_measured_in_place(tmp_path, monkeypatch):
    """DeepSeek-V3: the converter writes kv_b_proj [heads·(nope+v), rank] as attn_k_b [heads, rank, nope]
    (transposed per head) and attn_v_b [heads, v, rank]. The plan has one entry per written tensor whose
    values are the converter's (F16 file), the file follows the plan, and a kld plan measures each part
    in its place in the Hugging Face model (and leaves the model as it was)."""
    from transformers import AutoModelForCausalLM

    from ewq import rearranged
    from ewq.experts import ModelTensors
    from ewq.plan.files import load_plan

    model_dir = tiny_deepseek(tmp_path / "ds")
    plan = create_plan(str(model_dir), PlanParams(entropy_factor=0.3, fp16_factor=0.8))
    parts = {t.gguf_name: t for t in plan.tensors if t.source}
    assert sorted(parts) == [f"blk.{b}.attn_{kind}_b.weight" for b in (0, 1) for kind in "kv"]
    assert parts["blk.0.attn_k_b.weight"].shape == [4, 64, 32] and parts["blk.0.attn_v_b.weight"].shape == [4, 32, 64]
    assert all(t.source == f"model.layers.{t.block}.self_attn.kv_b_proj.weight" and t.is_matrix
               and not t.is_bnb_linear for t in parts.values())
    assert not any(t.hf_name == t.source for t in plan.tensors)
    read_back = quantize_and_read_back(plan, tmp_path / "plans", model_dir, tmp_path)
    assert read_back["check"]["matches_plan"] and read_back["check"]["tensors_checked"] == len(
        [t for t in plan.tensors if t.gguf_name])  # all but a vector (e_score_correction_bias) the map cannot name
    assert_parts_are_what_the_converter_writes(plan, model_dir, tmp_path / "f16.gguf")
    index = rearranged.model_parts(str(model_dir))

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    entry, tensors = parts["blk.1.attn_k_b.weight"], ModelTensors(model, index)
    before = model.get_parameter(entry.source).detach().clone()
    assert torch.equal(tensors.values(entry), index[entry.hf_name].of(before))
    tensors.assign(entry, torch.zeros(entry.shape))
    placed = torch.zeros(before.numel(), dtype=torch.bool)
    placed[torch.from_numpy(index[entry.hf_name].index).long()] = True
    after = model.get_parameter(entry.source).detach().reshape(-1)
    assert placed.sum() == entry.numel < before.numel()
    assert not after[placed].any() and torch.equal(after[~placed], before.reshape(-1)[~placed])

    result = run("create_quantization_plan.py", "--model", model_dir, "--target-size", "2500000", "--score", "kld",
                 "--no-keep-embeddings", "--no-keep-lm-head", "--calibration-windows", "1", "--calibration-context",
                 "64", "--out-dir", tmp_path / "kld")
    kld_plan = load_plan(Path(result.stdout.split()[0]))
    assert all(t.rank_score > 0 for t in kld_plan.tensors if t.source)
    read_back = quantize_and_read_back(kld_plan, tmp_path / "kld", model_dir, tmp_path / "kld")
    assert read_back["check"]["matches_plan"] and read_back["report"].weight_bytes == kld_plan.budget.gguf.bytes

    without_index_maps(monkeypatch)  # a matrix whose values the converter computed would be refused
    with pytest.raises(UserError, match=r"kv_b_proj.weight \[256, 64\] of .*writes blk.0.attn_k_b.weight \[4, 64, 32\], "
                                        r"blk.0.attn_v_b.weight \[4, 32, 64\]"):
        create_plan(str(model_dir), PlanParams())


def test_a_split_matrix_is_quantized_with_llama_imatrix_rows_per_head_as_llama_quantize_does(tmp_path):
    """llama-imatrix stores one flat vector [heads·cols] for DeepSeek's 3-D attn_k_b / attn_v_b (a plain
    matmul, not experts); llama-quantize reads head h's row at h·cols. Our round trip with it equals the
    file bit for bit (and without it does not: the importance changes the quantization)."""
    from gguf import GGUFReader, quants

    from ewq.llamacpp.tools import calibration_file
    from ewq.llamacpp import toolchain
    from ewq.llamacpp.quantizers import ImportanceMatrix, round_trip
    from ewq.quant_types import LlamaType

    f16 = llama_tools.convert_f16(tiny_deepseek(tmp_path / "ds"), tmp_path / "f16.gguf")
    imatrix_file = llama_tools.build_imatrix(f16, calibration_file(tmp_path), tmp_path / "imatrix.gguf", 128, 4)
    imatrix = ImportanceMatrix.load(imatrix_file)
    assert imatrix.for_tensor("blk.0.attn_k_b.weight").shape == (4 * 32,)
    planned = tmp_path / "q4_0.gguf"
    run_tool([toolchain.tool("llama-quantize"), "--imatrix", imatrix_file, "--tensor-type", "attn_k_b=q4_0",
                         "--tensor-type", "attn_v_b=q4_0", f16, planned, "Q8_0"], "quantize")
    source = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(f16).tensors}
    checked = 0
    for t in GGUFReader(planned).tensors:
        if t.name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            written = quants.dequantize(t.data, t.tensor_type).reshape(source[t.name].shape)
            ours = round_trip(source[t.name], LlamaType.Q4_0, imatrix.for_tensor(t.name))
            assert np.array_equal(written, ours), t.name
            assert not np.array_equal(written, round_trip(source[t.name], LlamaType.Q4_0)), t.name
            checked += 1
    assert checked == 4


def test_a_matrix_the_converter_cannot_name_is_refused(tmp_path, monkeypatch):
    from ewq.plan import create as build

    tiny_llama(num_layers=1).save_pretrained(tmp_path / "m", safe_serialization=True)
    real = build.gguf_names

    def without_one(model_dir, config, names):
        naming = real(model_dir, config, names)
        return dataclasses.replace(naming, names={**naming.names, "model.layers.0.mlp.up_proj.weight": None})

    monkeypatch.setattr(build, "gguf_names", without_one)
    with pytest.raises(UserError, match="have no GGUF name of their own"):
        create_plan(str(tmp_path / "m"), PlanParams())


def test_a_plan_with_an_unnamed_matrix_gets_no_files(tmp_path):
    tiny_llama(num_layers=2).save_pretrained(tmp_path / "m", safe_serialization=True)
    plan = create_plan(str(tmp_path / "m"), PlanParams())
    target = next(t for t in plan.tensors if t.is_matrix and t.block == 1)
    target.gguf_name = None
    with pytest.raises(UserError, match="without a GGUF name"):
        write_plan(plan, tmp_path / "plans")
    assert list((tmp_path / "plans").iterdir()) == []


def test_a_read_back_that_cannot_find_a_planned_tensor_fails(tmp_path):
    model_dir = tiny_cohere(tmp_path / "cohere")
    plan = create_plan(str(model_dir), PlanParams())
    read_back = quantize_and_read_back(plan, tmp_path / "plans", model_dir, tmp_path)
    target = next(t for t in plan.tensors if t.is_matrix and t.block == 1)
    target.gguf_name = "blk.1.not_in_the_file.weight"
    with pytest.raises(UserError, match="blk.1.not_in_the_file.weight: missing"):
        gguf_read.verify_plan(plan, read_back["file"])


def test_kld_plan_meets_its_budget_in_exact_bytes_and_the_file_follows_it(tmp_path):
    model_dir = with_tokenizer(tiny_llama(num_layers=3, vocab=49152, tie=True), tmp_path / "tied")
    budget = 2_500_000
    plans = tmp_path / "plans"
    args = ["--model", model_dir, "--target-size", str(budget), "--score", "kld", "--no-keep-embeddings",
            "--no-keep-lm-head", "--calibration-windows", "1", "--calibration-context", "64", "--out-dir", plans]
    first = run("create_quantization_plan.py", *args)
    assert "sensitivity: measuring" in first.stderr
    plan_file = Path(first.stdout.split()[0])
    from ewq.plan.files import load_plan

    plan = load_plan(plan_file)
    assert plan.params.score is Score.KLD and all(t.rank_score is not None for t in plan.tensors if t.is_matrix)
    assert len({t.llama_type for t in plan.tensors if t.is_matrix}) >= 2
    assert plan.budget.gguf.bytes <= budget and plan.budget.gguf.predicted_kld > 0
    read_back = quantize_and_read_back(plan, plans, model_dir, tmp_path)
    assert read_back["check"]["matches_plan"]
    assert read_back["report"].weight_bytes == plan.budget.gguf.bytes  # exact, as llama-quantize writes
    # a second plan at another budget measures nothing again: the sensitivities are cached
    smaller = budget * 85 // 100
    second = run("create_quantization_plan.py", *[str(smaller) if a == str(budget) else a for a in args])
    assert "sensitivity: measuring" not in second.stderr and "tensors from" in second.stderr
    assert "tensor menus from" in second.stderr and ", 0 measured" in second.stderr  # the distortion table too
    assert load_plan(Path(second.stdout.split()[0])).budget.gguf.bytes <= smaller


def test_a_kld_plan_loads_the_model_and_tokenizer_once_for_its_measurements_and_its_additivity(tmp_path, monkeypatch):
    """The sensitivities and the whole-plan check share one service: one model, one tokenizer, one
    unperturbed run (before, the additivity check loaded both again). From a full cache, the plan
    loads the model once, for the additivity check alone."""
    from ewq.backends import hf

    model_dir = with_tokenizer(tiny_llama(num_layers=2, vocab=49152, tie=True), tmp_path / "tied")
    loads = {"model": 0, "tokenizer": 0}
    real_model, real_tokenizer = hf.load_model, hf.load_tokenizer

    def counted(kind, real):
        def load(*args, **kwargs):
            loads[kind] += 1
            return real(*args, **kwargs)
        return load

    from ewq.sensitivity import service

    monkeypatch.setattr(hf, "load_model", counted("model", real_model))
    monkeypatch.setattr(hf, "load_tokenizer", counted("tokenizer", real_tokenizer))
    passes = []
    real_logits = service.window_logits
    monkeypatch.setattr(service, "window_logits", lambda model, ids: passes.append(1) or real_logits(model, ids))
    params = PlanParams(target_bytes=2_200_000, score=Score.KLD, keep_embeddings=False, keep_lm_head=False,
                        calibration_windows=2, calibration_context=32)
    plan = create_plan(str(model_dir), params, cache_dir=tmp_path / "plans")
    assert loads == {"model": 1, "tokenizer": 1}
    assert plan.budget.gguf.measured_kld_calibration > 0 and plan.budget.gguf.predicted_kld > 0
    first_passes, passes[:] = len(passes), []
    assert len(list((tmp_path / "plans").glob("kld_reference_*.safetensors"))) == 1
    again = create_plan(str(model_dir), params, cache_dir=tmp_path / "plans")  # every sensitivity cached
    assert loads == {"model": 2, "tokenizer": 2}
    assert len(passes) == 2 < first_passes  # the whole plan on 2 windows; the unperturbed logits from the file
    assert [t.llama_type for t in again.tensors] == [t.llama_type for t in plan.tensors]
    assert again.budget.gguf.measured_kld_calibration == pytest.approx(plan.budget.gguf.measured_kld_calibration,
                                                                       rel=1e-9)


def test_the_reference_logits_come_back_only_for_their_own_model_tokens_dtype_and_device(tmp_path):
    from ewq.sensitivity.cached import CalibrationSpec, load_references, references_file, save_references
    from ewq.sensitivity.service import Reference

    spec, tokens = CalibrationSpec(2, 3), torch.arange(6).reshape(2, 3)
    path, fingerprint = references_file(tmp_path, "abc", spec, tokens, "float32", "cpu")
    references = [Reference(torch.randn(3, 10)) for _ in range(2)]
    save_references(path, references, fingerprint)
    back = load_references(path, fingerprint, 2, 3)
    assert back is not None and all(torch.equal(a.logits, b.logits) for a, b in zip(references, back))
    for other in [references_file(tmp_path, "abd", spec, tokens, "float32", "cpu"),  # another model,
                  references_file(tmp_path, "abc", spec, tokens + 1, "float32", "cpu"),  # other tokens,
                  references_file(tmp_path, "abc", spec, tokens, "bfloat16", "cpu"),  # dtype,
                  references_file(tmp_path, "abc", spec, tokens, "float32", "cuda")]:  # device kind
        assert other[0] != path and load_references(path, other[1], 2, 3) is None
    assert load_references(path, fingerprint, 2, 4) is None  # other rows
    path.write_bytes(path.read_bytes()[:40])  # cut short: measured again
    assert load_references(path, fingerprint, 2, 3) is None


def test_a_kld_plan_of_another_architecture_measured_in_bands_is_the_file(tmp_path):
    """Cohere (its own logit scale, a tied embedding) with --sensitivity-band 2: one measurement per
    tensor kind and the embedding, the plan's types read back from the file, its bytes exact."""
    model_dir = tiny_cohere(tmp_path / "cohere")
    budget = 2_000_000
    plans = tmp_path / "plans"
    result = run("create_quantization_plan.py", "--model", model_dir, "--target-size", str(budget), "--score", "kld",
                 "--sensitivity-band", "2", "--no-keep-embeddings", "--no-keep-lm-head", "--calibration-windows", "1",
                 "--calibration-context", "64", "--out-dir", plans)
    assert "sensitivity: measuring 8 groups/tensors" in result.stderr  # 7 kinds x 1 band of 2 layers + embedding
    from ewq.plan.files import load_plan

    plan = load_plan(Path(result.stdout.split()[0]))
    assert plan.params.sensitivity_band == 2 and plan.budget.gguf.bytes <= budget
    assert len({t.llama_type for t in plan.tensors if t.is_matrix}) >= 2
    read_back = quantize_and_read_back(plan, plans, model_dir, tmp_path)
    assert read_back["check"]["matches_plan"] and read_back["report"].weight_bytes == plan.budget.gguf.bytes


def test_calibration_text_never_overlaps_the_evaluation_text():
    calibration = wiki.calibration_text(assets.wiki_file())
    evaluation = wiki.eval_text(assets.wiki_file())
    calibration_titles = {a.title for a in wiki.articles_for(assets.wiki_file(), "calibration")}
    evaluation_titles = {a.title for a in wiki.articles_for(assets.wiki_file(), "eval")}
    assert calibration_titles and evaluation_titles and not calibration_titles & evaluation_titles
    paragraphs = {p for p in evaluation.split("\n") if len(p) > 80}  # no long paragraph of one in the other
    assert paragraphs and not any(p in calibration for p in paragraphs)


def test_kld_scores_need_a_budget_and_the_calibration_flags_need_kld(tmp_path):
    tiny_llama(num_layers=2).save_pretrained(tmp_path / "m", safe_serialization=True)
    result = run("create_quantization_plan.py", "--model", tmp_path / "m", "--score", "kld", "--out-dir", tmp_path / "p",
                 check=False)
    assert_usage_error(result, "size budget")
    result = run("create_quantization_plan.py", "--model", tmp_path / "m", "--target-bpw", "8", "--calibration-windows",
                 "1", "--out-dir", tmp_path / "p", check=False)
    assert_usage_error(result, "go with --score kld")
    result = run("create_quantization_plan.py", "--model", tmp_path / "m", "--sensitivity-band", "4",
                 "--out-dir", tmp_path / "p", check=False)
    assert_usage_error(result, "go with --score kld")
    result = run("create_quantization_plan.py", "--model", tmp_path / "m", "--target-bpw", "8", "--dtype", "bfloat16",
                 "--out-dir", tmp_path / "p", check=False)
    assert_usage_error(result, "go with --score kld")
    result = run("create_quantization_plan.py", "--model", tmp_path / "m", "--target-bpw", "8", "--device-map", "auto",
                 "--out-dir", tmp_path / "p", check=False)
    assert_usage_error(result, "go with --score kld")
    assert not (tmp_path / "p").exists()


def test_a_kld_plan_measured_in_bf16_says_so_and_keeps_its_own_measurements(tmp_path, monkeypatch):
    """The measurement's dtype is the plan's: recorded (float32, the default, as before it could be
    chosen: same params, same hash), the model loaded in it, its sensitivities cached apart."""
    from ewq.backends import hf

    model_dir = with_tokenizer(tiny_llama(num_layers=2, vocab=49152, tie=True), tmp_path / "tied")
    loaded = []
    real_load = hf.load_model

    def load(model, device, dtype, *args, **kwargs):
        loaded.append(dtype)
        return real_load(model, device, dtype, *args, **kwargs)

    monkeypatch.setattr(hf, "load_model", load)
    common = dict(target_bytes=2_200_000, score=Score.KLD, keep_embeddings=False, keep_lm_head=False,
                  calibration_windows=1, calibration_context=32)
    plans = tmp_path / "plans"
    float32 = create_plan(str(model_dir), PlanParams(**common), cache_dir=plans)
    bf16 = create_plan(str(model_dir), PlanParams(**common, measure_dtype="bfloat16"), cache_dir=plans)
    assert loaded == [torch.float32, torch.bfloat16]
    assert "measure_dtype" not in float32.params.to_json() and bf16.params.to_json()["measure_dtype"] == "bfloat16"
    assert float32.plan_hash != bf16.plan_hash
    caches = [json.loads(path.read_text())["fingerprint"] for path in sorted(plans.glob("kld_sensitivity_*.json"))]
    assert sorted(c.get("dtype", "float32") for c in caches) == ["bfloat16", "float32"]
    assert bf16.budget.gguf.predicted_kld > 0 and bf16.budget.gguf.bytes <= common["target_bytes"]


def test_replayed_layers_give_the_full_forward_kld_and_the_model_is_left_as_it_was():
    from ewq.experts import ModelTensors
    from ewq.quant_types import LlamaType
    from ewq.sensitivity.service import Group, SensitivityService, groups_for, window_logits
    from ewq.sensitivity.swap import swapped

    model = tiny_llama(num_layers=4)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.2.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    entries = [plan_entry(model, name) for name in names]
    before = {name: model.get_parameter(name).clone() for name in names}
    groups = groups_for(entries, None) + [Group("pair", tuple(entries[:2]))]
    service = SensitivityService(model, tokens, None)
    replayed = service.measure_groups(groups, {name: LlamaType.Q4_0 for name in names}, {})
    with torch.inference_mode():
        reference = [torch.log_softmax(window_logits(model, w).double(), dim=-1) for w in tokens]
    for group in groups:  # the same perturbation, every layer run, KLD from its definition (in float64)
        with torch.inference_mode(), swapped(ModelTensors(model), [(e, LlamaType.Q4_0) for e in group.entries], None):
            full = sum(float((r.exp() * (r - torch.log_softmax(window_logits(model, w).double(), dim=-1))).sum(-1).mean())
                       for r, w in zip(reference, tokens)) / len(tokens)
        assert replayed[group.name] == pytest.approx(full, rel=1e-4) and full > 0
    assert all(torch.equal(before[name], model.get_parameter(name)) for name in names)
    assert not any("forward" in vars(layer) for layer in model.model.layers)


def test_a_swap_gives_each_tensors_error_only_when_asked_and_the_same_values_either_way():
    """swapped(errors=...) records each entry's relative error (quantizers.weighted_error of the round trip);
    without it no error is computed, and the swapped values are the same."""
    from ewq.experts import ModelTensors
    from ewq.llamacpp.quantizers import round_trip, weighted_error
    from ewq.quant_types import LlamaType
    from ewq.sensitivity.swap import swapped

    model = tiny_llama(num_layers=2)
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    entries = [plan_entry(model, name) for name in names]
    original = {name: model.get_parameter(name).detach().float().numpy().copy() for name in names}
    changes = [(e, LlamaType.Q4_K if e.ncols % 256 == 0 else LlamaType.Q4_0) for e in entries]
    values, errors = [], {}
    for asked in (errors, None):
        with torch.inference_mode(), swapped(ModelTensors(model), changes, None, asked):
            values.append({name: model.get_parameter(name).clone() for name in names})
    assert all(torch.equal(values[0][name], values[1][name]) for name in names)
    for entry, llama_type in changes:
        expected = weighted_error(original[entry.hf_name], round_trip(original[entry.hf_name], llama_type))
        assert errors[entry.hf_name] == pytest.approx(expected, rel=1e-9) and expected > 0
        assert not torch.equal(values[1][entry.hf_name], model.get_parameter(entry.hf_name))  # restored


def test_a_groups_marginal_in_context_is_the_plans_kld_less_the_plans_without_it_and_the_model_is_restored():
    """in_context against its definition: every marginal is KLD(plan) − KLD(plan without the group), each
    measured here by swapping the plan afresh; in llama.cpp's arithmetic the group's inputs are no longer
    rounded once it is back; the model and its hooks are as they were."""
    from ewq.quant_types import Arithmetic, LlamaType
    from ewq.sensitivity.service import Group, SensitivityService, groups_for

    model = tiny_llama(num_layers=3, hidden=64)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "model.layers.2.mlp.up_proj.weight", "model.layers.2.self_attn.o_proj.weight"]
    entries = [plan_entry(model, name) for name in names]
    plan = list(zip(entries, [LlamaType.Q4_0, LlamaType.Q4_1, LlamaType.Q5_0, LlamaType.Q4_0]))
    before = {name: model.get_parameter(name).clone() for name in names}
    service = SensitivityService(model, tokens, None)
    groups = groups_for(entries[:2], None) + [Group("last block", tuple(entries[2:]))]
    for arithmetic in (Arithmetic.WEIGHTS, Arithmetic.CPU):
        seen = []
        whole, marginal = service.in_context(plan, groups, arithmetic, on_group=lambda w, m: seen.append(len(m)))
        assert whole == pytest.approx(service.measure(plan, arithmetic=arithmetic).mean_kld, rel=1e-6) and whole > 0
        for group in groups:
            rest = [(e, q) for e, q in plan if e not in group.entries]
            assert marginal[group.name] == pytest.approx(whole - service.measure(rest, arithmetic=arithmetic).mean_kld,
                                                         rel=1e-5, abs=1e-9)
            assert marginal[group.name] > 0
        assert seen == [1, 2, 3]
        again = service.in_context(plan, groups, arithmetic, done={groups[0].name: -1.0})[1]
        assert again[groups[0].name] == -1.0 and again[groups[1].name] == pytest.approx(marginal[groups[1].name])
    assert all(torch.equal(before[name], model.get_parameter(name)) for name in names)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_correction_round_reallocates_from_the_marginals_in_context_and_caches_them(tmp_path, monkeypatch):
    """--correction-band: the first allocation measured in context, every ranked tensor's α scaled by its
    group's factor, the plan decided again within its budget, the first allocation's prediction and
    measurement recorded; a second run takes the marginals from the cache."""
    from ewq.sensitivity.cached import CachedSensitivity
    from ewq.sensitivity.service import SensitivityService

    model_dir = with_tokenizer(tiny_llama(num_layers=2, vocab=49152, tie=True), tmp_path / "tied")
    common = dict(target_bytes=2_200_000, score=Score.KLD, keep_embeddings=False, keep_lm_head=False,
                  calibration_windows=2, calibration_context=32)
    first = create_plan(str(model_dir), PlanParams(**common), cache_dir=tmp_path / "plans")
    seen, real = [], CachedSensitivity.in_context

    def spy(self, changes, groups, arithmetic):
        out = real(self, changes, groups, arithmetic)
        seen.append(({e.hf_name: q for e, q in changes}, groups, out))
        return out

    monkeypatch.setattr(CachedSensitivity, "in_context", spy)
    corrected = create_plan(str(model_dir), PlanParams(**common, correction_band=1), cache_dir=tmp_path / "plans")
    (types, groups, (whole, marginal)), = seen
    assert types == {t.hf_name: t.llama_type for t in first.tensors if not t.is_kept}  # the first allocation's
    assert len(groups) == len(types) and whole == pytest.approx(first.budget.gguf.measured_kld_calibration, rel=1e-6)
    assert corrected.params.correction_band == 1 and corrected.budget.gguf.bytes <= common["target_bytes"]
    assert corrected.budget.gguf.measured_kld_calibration > 0
    assert corrected.budget.gguf.first_predicted_kld == pytest.approx(first.budget.gguf.predicted_kld, rel=1e-9)
    assert corrected.budget.gguf.first_measured_kld_calibration == whole
    assert first.budget.gguf.first_predicted_kld is None  # no round, nothing recorded
    measured = []
    real_service = SensitivityService.in_context
    monkeypatch.setattr(SensitivityService, "in_context", lambda *a, **k: measured.append(1) or real_service(*a, **k))
    again = create_plan(str(model_dir), PlanParams(**common, correction_band=1), cache_dir=tmp_path / "plans")
    assert len(seen) == 2 and not measured and seen[1][2] == seen[0][2]  # from the cache, as measured
    assert [t.llama_type for t in again.tensors] == [t.llama_type for t in corrected.tensors]


def test_a_bf16_model_is_measured_with_its_output_projection_in_float32():
    """bf16 logits are rounded to ~2^-8 of their size; the measurement's head runs in float32 on the
    decoder's bf16 output, as its float64 product does within float32 rounding, and is left unhooked."""
    from ewq.sensitivity.service import window_logits

    model = tiny_llama(num_layers=2, hidden=256, vocab=512, seed=3).to(torch.bfloat16)
    ids = torch.randint(0, 512, (48,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = window_logits(model, ids)
        out = model(input_ids=ids[None], use_cache=False, output_hidden_states=True)
        exact = out.hidden_states[-1][0].double() @ model.lm_head.weight.double().T  # the final norm's output
    assert logits.dtype == torch.float32
    float32_error = float((logits.double() - exact).abs().max())
    bf16_error = float((out.logits[0].double() - exact).abs().max())
    assert float32_error < 1e-4 * float(exact.abs().max()) and bf16_error > 20 * float32_error
    assert not model.lm_head._forward_hooks


def test_token_kld_is_the_definition_for_small_and_large_perturbations():
    from ewq.metrics.kld import token_kld

    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(100, 50, generator=generator, dtype=torch.float64)
    for scale in (1e-4, 0.3, 200.0):  # 200: expm1 overflows in float32, the log-softmax form takes over
        moved = logits + scale * torch.randn(100, 50, generator=generator, dtype=torch.float64)
        p, q = torch.log_softmax(logits, -1), torch.log_softmax(moved, -1)
        exact = (p.exp() * (p - q)).sum(-1)
        ours = token_kld(logits.float(), moved.float(), rows=7)
        assert float(ours.mean()) == pytest.approx(float(exact.mean()), rel=1e-3) and float(exact.mean()) > 0
        assert ours.shape == (100,) and torch.allclose(ours, exact, rtol=1e-2, atol=1e-7)
        # log-probs instead of logits (the benchmarks' stored reference): a shift per row cancels
        assert torch.allclose(token_kld(p.float(), q.float()), ours, rtol=1e-3, atol=1e-7)
    assert float(token_kld(logits.float(), logits.float()).abs().max()) == 0


def test_sensitivity_groups_are_a_tensor_kind_over_a_band_of_layers():
    from ewq.sensitivity.service import groups_for

    model = tiny_llama(num_layers=5)
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")] + ["model.embed_tokens.weight"]
    entries = [plan_entry(model, name) for name in names]
    assert [g.name for g in groups_for(entries, None)] == names
    groups = {g.name: [e.hf_name for e in g.entries] for g in groups_for(entries, 2)}
    assert groups["model.layers.{}.mlp.down_proj.weight[0-1]"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    assert groups["model.layers.{}.mlp.down_proj.weight[4-4]"] == ["model.layers.4.mlp.down_proj.weight"]
    assert groups["model.embed_tokens.weight"] == ["model.embed_tokens.weight"]
    assert sorted(sum(groups.values(), [])) == sorted(names) and len(groups) == 7 * 3 + 1


def plan_entry(model, name):
    from ewq.plan import TensorEntry
    from ewq.weights import block_index

    param = model.get_parameter(name)
    return TensorEntry(hf_name=name, gguf_name=None, block=block_index(name), shape=list(param.shape), dtype="F32",
                       numel=param.numel(), entropy_bits=0.0, std=1.0, max_abs_over_std=1.0, excess_kurtosis=0.0)


def test_bands_of_layers_rank_the_default_models_tensors_like_measuring_each_alone():
    """The cheaper estimate (--sensitivity-band 4: 57 measurements instead of 211) against every tensor
    measured alone, on the default model with 1 x 128 calibration tokens: the rank correlation of the
    predicted ΔKLD at the reference type (0.95 measured against the full 2 x 512 measurement)."""
    from ewq import weights
    from ewq.backends import hf
    from ewq.llamacpp.quantizers import relative_error
    from ewq.metrics.stats import spearman
    from ewq.plan.create import name_model, read_entries
    from ewq.plan.scores import sensitivity
    from ewq.quant_types import reference_type
    from ewq.sensitivity.cached import CalibrationSpec, calibration_tokens
    from ewq.sensitivity.service import SensitivityService, groups_for

    files = weights.open_model(assets.default_model())
    params = PlanParams(target_bpw=6.0, score=Score.KLD, keep_embeddings=False, keep_lm_head=False)
    floor_error = {}

    def observe(entry, values):
        if not entry.is_kept:
            floor_error[entry.hf_name] = relative_error(values.float().numpy(), reference_type(entry.ncols))

    ranked = [e for e in read_entries(files, params, name_model(files), observe) if e.hf_name in floor_error]
    reference = {e.hf_name: reference_type(e.ncols) for e in ranked}
    model = hf.load_model(files.root, "cpu", torch.float32)
    tokens = calibration_tokens(hf.load_tokenizer(files.root), CalibrationSpec(1, 128))
    service = SensitivityService(model, tokens, None)
    predicted = {}
    for band in (None, 4):
        groups = groups_for(ranked, band)
        alpha = sensitivity(groups, service.measure_groups(groups, reference, {}), floor_error)
        predicted[band] = [alpha[name] * floor_error[name] for name in sorted(floor_error)]
    assert len(ranked) == 211 and len(groups_for(ranked, 4)) == 57
    assert spearman(predicted[None], predicted[4]) >= 0.9


@pytest.mark.parametrize("grid", ["Q4_1", "Q8_0"])
def test_the_noise_stand_in_leaves_its_grid_without_keeping_its_blocks(grid):
    """benchmarks/off_grid.py: a matrix on a llama.cpp grid (as the default model's are) is found on it and
    quantizing it again costs nothing; with the noise, its weights' places between the grid's levels are
    near uniform, the noise's scale does not follow the 32-weight blocks (one scale per row), and
    quantizing it again costs about a quarter of a step per weight, as a trained model does."""
    from benchmarks.off_grid import NOISE_STEPS, grid_step, off_grid
    from ewq.llamacpp.quantizers import round_trip
    from ewq.quant_types import LlamaType

    rows = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    rows *= np.random.default_rng(1).uniform(0.2, 5.0, (64, 1)).astype(np.float32)  # rows of unlike scale
    on_grid = torch.from_numpy(round_trip(rows, LlamaType(grid)))
    found, step = grid_step(on_grid)
    assert found == grid
    name, moved = off_grid(on_grid, torch.Generator().manual_seed(0))
    assert name == grid
    with pytest.raises(ValueError, match="neither"):
        grid_step(moved)
    offset = on_grid.reshape(-1, 32).amin(dim=1, keepdim=True) if grid == "Q4_1" else 0.0
    levels = (moved.reshape(-1, 32) - offset) / step
    place = levels - levels.round()  # in [-1/2, 1/2]: uniform when the grid is gone
    assert abs(torch.exp(2j * torch.pi * place.double()).mean()) < 0.1
    noise = (moved - on_grid).reshape(-1, 32)
    block_scale, row_step = noise.std(dim=1), step.reshape(64, -1).mean(dim=1)
    per_row = (noise.reshape(64, -1).std(dim=1) / row_step)
    assert ((per_row - NOISE_STEPS).abs() < 0.1 * NOISE_STEPS).all()
    # within a row the blocks' noise does not grow with their own step (uniform noise of a block's step would)
    relative_step = (step.reshape(64, -1) / row_step[:, None]).flatten()
    relative_noise = (block_scale.reshape(64, -1) / block_scale.reshape(64, -1).mean(dim=1, keepdim=True)).flatten()
    assert abs(float(torch.corrcoef(torch.stack([relative_step, relative_noise]))[0, 1])) < 0.2

    def error_in_steps(matrix: torch.Tensor) -> float:  # mean |round trip - matrix| / step
        approx = torch.from_numpy(round_trip(matrix.numpy(), LlamaType(grid)))
        return float(((approx - matrix).reshape(-1, 32).abs() / step).mean())

    assert error_in_steps(on_grid) == 0 and 0.15 < error_in_steps(moved) < 0.35


def test_a_measurement_under_accelerate_hooks_keeps_them_and_a_last_one_keeps_no_copy():
    """A model spread by a device map runs its layers through accelerate's hooks (an instance forward): the
    replay hands those layers back; a last measurement (restore False) gives the KLD of a restored one and
    leaves the model perturbed rather than holding its tensors twice."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from ewq.quant_types import LlamaType
    from ewq.sensitivity.service import SensitivityService

    model = tiny_llama(num_layers=4)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.2.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight"]
    changes = [(plan_entry(model, name), LlamaType.Q4_0) for name in names]
    plain = SensitivityService(model, tokens, None).measure(changes).mean_kld
    for layer in model.model.layers:
        add_hook_to_module(layer, ModelHook())
    hooked_forward = [vars(layer)["forward"] for layer in model.model.layers]
    service = SensitivityService(model, tokens, None)
    assert service.measure(changes).mean_kld == pytest.approx(plain, rel=1e-6)
    assert [vars(layer).get("forward") for layer in model.model.layers] == hooked_forward
    before = model.get_parameter(names[0]).clone()
    assert service.measure(changes, restore=False).mean_kld == pytest.approx(plain, rel=1e-6)
    assert not torch.equal(before, model.get_parameter(names[0]))


def test_a_model_for_one_gpu_is_loaded_straight_onto_it_and_one_for_the_cpu_on_the_host(monkeypatch):
    """transformers places each tensor on the device it is given as device_map: no whole copy in host RAM first
    (before: loaded on the host, then .to(device))."""
    from transformers import AutoModelForCausalLM

    from ewq.backends import hf

    asked = []

    class Loaded(torch.nn.Module):
        def to(self, where):
            asked.append(("to", where))
            return self

    def from_pretrained(model_dir, dtype, device_map):
        asked.append(("device_map", device_map, dtype))
        return Loaded()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    hf.load_model("m", "cuda:1", torch.bfloat16)
    hf.load_model("m", "cuda", torch.bfloat16, device_map="auto")
    hf.load_model("m", "cpu", torch.float32)
    assert asked == [("device_map", "cuda:1", torch.bfloat16), ("device_map", "auto", torch.bfloat16),
                     ("device_map", None, "auto"), ("to", torch.float32), ("to", "cpu")]


def test_a_bf16_checkpoint_asked_for_in_float32_on_the_host_gives_the_weights_of_a_direct_float32_load(tmp_path):
    """The host path loads in the checkpoint's dtype and widens (no float32 copy beside the mapped file): the
    result must be what transformers gives when asked for float32, parameter for parameter and in its logits."""
    from transformers import AutoModelForCausalLM

    from ewq.backends import hf

    path = tmp_path / "bf16"
    tiny_llama(num_layers=2).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    widened = hf.load_model(path, "cpu", torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, theirs = dict(widened.named_parameters()), dict(direct.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, parameter in ours.items():
        assert parameter.dtype == torch.float32, name
        assert torch.equal(parameter, theirs[name]), name
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(widened(ids).logits, direct(ids).logits)


def test_a_device_map_that_offloads_beside_gpus_is_refused_in_one_line():
    from ewq.sensitivity.cached import check_in_place

    class Placed(torch.nn.Module):
        def __init__(self, placement):
            super().__init__()
            self.hf_device_map = placement

    for fine in ({}, {"": "cpu"}, {"model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}):
        check_in_place(Placed(fine))
    for offloading in ({"model.layers.0": 0, "model.layers.1": "cpu"}, {"model.layers.0": 0, "lm_head": "disk"}):
        with pytest.raises(UserError, match="swaps tensors in place"):
            check_in_place(Placed(offloading))


def test_what_a_swap_keeps_to_restore_is_exact_and_as_narrow_as_the_values_allow():
    """A bf16 checkpoint measured in float32 is restored from a bf16 copy (half the bytes), a float32 one
    from a float32 copy; both give back the very values."""
    from ewq.sensitivity.swap import exact_copy

    on_bf16 = torch.randn(300, 64).to(torch.bfloat16).float()
    on_fp16 = (torch.randn(300, 64) * 1e-3).to(torch.float16).float()
    full = torch.randn(300, 64)
    for values, kept in ((on_bf16, torch.bfloat16), (on_fp16, torch.float16), (full, torch.float32)):
        copy = exact_copy(values)
        assert copy.dtype is kept and torch.equal(copy.float(), values)
    assert exact_copy(on_bf16.to(torch.bfloat16)).dtype is torch.bfloat16
