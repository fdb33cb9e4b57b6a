"""Plans a GGUF file must follow: names from llama.cpp's converter, no silent failure, and the kld score
end to end on tiny models (types and exact bytes read back from the quantized file)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_usage_error, run, tiny_llama
from ewq import assets
from ewq.data import wiki
from ewq.errors import UserError
from ewq.llamacpp import files as gguf_files
from ewq.llamacpp.script import quantize_script
from ewq.plan import PlanParams, Score
from ewq.plan.build import create_plan
from ewq.plan.files import write_plan

CALIBRATION = dict(calibration_windows=1, calibration_context=64)


def with_tokenizer(model, path: Path) -> Path:
    """Save a tiny model with SmolLM2's tokenizer (its vocabulary size), so that llama.cpp can convert it."""
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.save_pretrained(path, safe_serialization=True)
    for source in Path(assets.default_model()).iterdir():
        if source.name.startswith("tokenizer") or source.suffix == ".jinja":
            shutil.copy(source, path / source.name)
    return path


def tiny_cohere(path: Path) -> Path:
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return with_tokenizer(CohereForCausalLM(config).eval(), path)


def quantize_and_read_back(plan, plan_dir: Path, model_dir: Path, tmp_path: Path) -> dict:
    _, script = write_plan(plan, plan_dir)
    f16 = gguf_files.convert_f16(model_dir, tmp_path / "f16.gguf")
    out = gguf_files.quantize_with_plan(script, f16, tmp_path / "planned.gguf", None)
    return {"check": gguf_files.verify_plan(plan, out), "file": out, "report": gguf_files.describe(out)}


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


def test_matrices_the_converter_merges_are_refused(tmp_path):
    """Qwen3-MoE: llama.cpp stacks the experts into one tensor per block; a plan cannot follow that yet."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=128)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe", safe_serialization=True)
    result = run("create_quantization_plan.py", "--model", tmp_path / "moe", "--out-dir", tmp_path / "plans", check=False)
    assert_usage_error(result, "have no GGUF name of their own")
    assert not (tmp_path / "plans").exists()


def test_an_architecture_the_converter_does_not_know_is_refused(tmp_path):
    model = tmp_path / "unknown"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["FrobnicatorForCausalLM"], "num_hidden_layers": 1}))
    save_file({"model.layers.0.proj.weight": torch.zeros(8, 8)}, str(model / "model.safetensors"))
    with pytest.raises(UserError, match="converter does not know"):
        create_plan(str(model), PlanParams())


def test_a_plan_with_an_unnamed_matrix_gets_no_script_and_fails_its_read_back(tmp_path):
    tiny_llama(num_layers=2).save_pretrained(tmp_path / "m", safe_serialization=True)
    plan = create_plan(str(tmp_path / "m"), PlanParams())
    target = next(t for t in plan.tensors if t.is_matrix and t.block == 1)
    target.gguf_name = None
    with pytest.raises(UserError, match="without a GGUF name"):
        quantize_script(plan)


def test_a_read_back_that_cannot_find_a_planned_tensor_fails(tmp_path):
    model_dir = tiny_cohere(tmp_path / "cohere")
    plan = create_plan(str(model_dir), PlanParams())
    read_back = quantize_and_read_back(plan, tmp_path / "plans", model_dir, tmp_path)
    target = next(t for t in plan.tensors if t.is_matrix and t.block == 1)
    target.gguf_name = "blk.1.not_in_the_file.weight"
    with pytest.raises(UserError, match="blk.1.not_in_the_file.weight: missing"):
        gguf_files.verify_plan(plan, read_back["file"])


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
    assert plan.budget["gguf"]["bytes"] <= budget and plan.budget["gguf"]["predicted_kld"] > 0
    read_back = quantize_and_read_back(plan, plans, model_dir, tmp_path)
    assert read_back["check"]["matches_plan"]
    assert read_back["report"].weight_bytes == plan.budget["gguf"]["bytes"]  # exact, as llama-quantize writes
    # a second plan at another budget measures nothing again: the sensitivities are cached
    smaller = budget * 85 // 100
    second = run("create_quantization_plan.py", *[str(smaller) if a == str(budget) else a for a in args])
    assert "sensitivity: measuring" not in second.stderr and "tensors from" in second.stderr
    assert load_plan(Path(second.stdout.split()[0])).budget["gguf"]["bytes"] <= smaller


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
    assert not (tmp_path / "p").exists()


def test_replayed_layers_give_the_full_forward_kld_and_the_model_is_left_as_it_was():
    from ewq.llamacpp.types import LlamaType
    from ewq.plan import measure

    model = tiny_llama(num_layers=4)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.2.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    entries = [plan_entry(model, name) for name in names]
    before = {name: model.get_parameter(name).clone() for name in names}
    replayed = measure.measure(model, entries, {name: LlamaType.Q4_0 for name in names}, tokens, None, {})
    with torch.inference_mode():
        reference = [measure._log_probs(model, window) for window in tokens]
    for entry in entries:  # the same perturbation, every layer run
        saved = measure.swap_in_round_trip(model, entry, LlamaType.Q4_0, None)
        with torch.inference_mode():
            full = sum(measure._kld(r, measure._log_probs(model, w)) for r, w in zip(reference, tokens)) / len(tokens)
        model.get_parameter(entry.hf_name).data.copy_(saved)
        assert replayed[entry.hf_name] == pytest.approx(full, rel=1e-6) and full > 0
    assert all(torch.equal(before[name], model.get_parameter(name)) for name in names)
    assert not any("forward" in vars(layer) for layer in model.model.layers)


def plan_entry(model, name):
    from ewq.plan import TensorEntry
    from ewq.plan.model import block_index

    param = model.get_parameter(name)
    return TensorEntry(hf_name=name, gguf_name=None, block=block_index(name), shape=list(param.shape), dtype="F32",
                       numel=param.numel(), entropy_bits=0.0, std=1.0, max_abs_over_std=1.0, excess_kurtosis=0.0)
