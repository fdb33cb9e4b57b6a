"""The scripts end to end on the shipped default model (--quick), and their bad-input paths."""
import json
import math
import os

import pytest
import torch

from conftest import SCRIPTS, assert_usage_error, run, tiny_llama


def test_plan_files(pipeline):
    plan = json.loads(pipeline["plan"].read_text())
    assert pipeline["plan"].name == f"quant_plan_{plan['plan_hash']}.json"
    assert pipeline["script"].name == f"quantize_command_{plan['plan_hash']}.sh"
    assert len(plan["blocks"]) == 30 and len(plan["tensors"]) == 272
    summary = plan["summary"]["matrices_by_precision"]
    assert summary["4bit"]["tensors"] > 0 and summary["8bit"]["tensors"] > 0
    assert os.access(pipeline["script"], os.X_OK)


def test_results_carry_real_numbers_with_errors(pipeline):
    original, ewq = pipeline["files"]["original"], pipeline["files"]["ewq-bnb"]
    assert original["settings"] == ewq["settings"] and original["model_hash"] == ewq["model_hash"]
    assert ewq["plan_hash"] == json.loads(pipeline["plan"].read_text())["plan_hash"]
    for result in (original, ewq):
        m = result["metrics"]
        assert 1 < m["perplexity"]["ppl"]["value"] < 1000 and m["perplexity"]["ppl"]["se"] > 0
        assert m["perplexity"]["ppl"]["n_tokens"] == 8 * 256
        assert m["mmlu"]["accuracy"]["n"] == 114 and m["mmlu"]["accuracy"]["se"] > 0
        assert len(m["mmlu"]["per_subject"]) == 57
        assert m["generation"]["decode_tokens_per_s"]["value"] > 0
        assert m["generation"]["latency_s"]["p95"] >= m["generation"]["latency_s"]["p50"] > 0
        assert m["generation"]["summarization"]["rouge"]["rougeL"]["n"] == 3
        assert m["memory_peak"]["peak_rss_bytes"] > m["weights"]["weight_bytes"]
    w = ewq["metrics"]["weights"]
    assert w["verified_against_plan"] and 4.0 < w["linear_by_precision"]["4bit"]["bits_per_weight"] < 4.3
    assert w["bits_per_weight"] < original["metrics"]["weights"]["bits_per_weight"]
    kld = ewq["metrics"]["perplexity"]["kld"]
    assert kld["mean"] > 0 and kld["se"] > 0 and kld["n_tokens"] == 8 * 256 and kld["p99"] > kld["mean"]
    assert 0 < ewq["metrics"]["perplexity"]["same_top1"]["mean"] < 1
    comparison = ewq["comparison_vs_original"]
    assert comparison["mean_nll_delta"]["n"] == 8 and comparison["mmlu_accuracy_delta"]["n"] == 114
    assert math.isclose(comparison["ppl_ratio"], ewq["metrics"]["perplexity"]["ppl"]["value"]
                        / original["metrics"]["perplexity"]["ppl"]["value"], rel_tol=1e-6)
    assert 0 <= ewq["metrics"]["generation"]["rougeL_vs_original"]["mean"] <= 1
    reference = pipeline["results"] / original["metrics"]["perplexity"]["kld_reference"]["file"]
    assert reference.is_file() and not list(pipeline["results"].glob(".*partial"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = run(script, "--help")
    assert "usage" in result.stdout and "--out-dir" in result.stdout


def test_bad_inputs_exit_2_and_write_nothing(pipeline, tmp_path):
    results = pipeline["results"]
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    assert_usage_error(run("create_quantization_plan.py", "--model", "/no/such/dir", "--out-dir", tmp_path / "p",
                           check=False), "model not found")
    assert not (tmp_path / "p").exists()
    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    assert_usage_error(run("benchmark_ewq.py", "--quick", "--plan", not_json, "--out-dir", results, check=False),
                       "not valid JSON")
    assert_usage_error(run("benchmark_original.py", "--quick", "--mmlu-per-subject", "0", "--out-dir", results,
                           check=False), "--mmlu-per-subject")
    assert_usage_error(run("benchmark_original.py", "--quick", "--eval-text", tmp_path / "missing.txt",
                           "--out-dir", results, check=False), "evaluation text not found")
    if not torch.cuda.is_available():
        assert_usage_error(run("benchmark_original.py", "--quick", "--device", "cuda", check=False), "no CUDA GPU")
    other_model = tmp_path / "other"
    tiny_llama(num_layers=2).save_pretrained(other_model, safe_serialization=True)
    foreign = run("create_quantization_plan.py", "--model", other_model, "--out-dir", tmp_path).stdout.split()[0]
    assert_usage_error(run("benchmark_ewq.py", "--quick", "--plan", foreign, "--out-dir", results, check=False),
                       "was made for model hash")
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
