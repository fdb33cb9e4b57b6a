"""Issue 4 end to end on the default model: a size-budget plan at Q4_K_M's size, the sensitivity
study, and the comparison report built from the pipeline's results."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_usage_error, run
from ewq import plan as plan_mod
from ewq.llamacpp import gguf_read

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def budget_run(pipeline):
    q4 = Path(pipeline["files"]["gguf-q4_k_m"]["gguf"]["file"])
    model_hash = pipeline["files"]["original"]["model_hash"]
    imatrix = q4.parent / f"{model_hash}-imatrix.gguf"
    out = run("create_quantization_plan.py", "--target-size", q4, "--score", "error", "--imatrix", imatrix,
              "--no-keep-embeddings", "--no-keep-lm-head", "--out-dir", pipeline["root"] / "budget").stdout.split()
    result = run("benchmark_gguf_ewq.py", "--quick", "--plan", out[0], "--gguf-dir", q4.parent,
                 "--out-dir", pipeline["results"], "--skip", "mmlu", "--skip", "generation").stdout.split()[-1]
    return {"plan": Path(out[0]), "result": json.loads(Path(result).read_text()), "q4": q4}


def test_budget_plan_meets_q4_k_m_size_and_the_file_follows_it(budget_run):
    plan = plan_mod.load_plan(budget_run["plan"])
    result = budget_run["result"]
    q4_bytes = gguf_read.describe(budget_run["q4"]).weight_bytes
    assert result["plan_check"]["matches_plan"] and result["tag"] == plan.plan_hash
    assert 0.99 * q4_bytes < result["gguf"]["weight_bytes"] <= q4_bytes
    assert result["skipped_stages"] == ["generation", "mmlu"]
    assert "mmlu" not in result["metrics"] and result["metrics"]["perplexity"]["kld"]["mean"] > 0
    assert plan.params.score == "error" and plan.params.imatrix_digest
    assert len({t.llama_type for t in plan.tensors if t.is_matrix}) >= 2


def test_sensitivity_study_measures_every_block_and_kind(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    paths = run("study_sensitivity.py", "--windows", 2, "--context", 64, "--stride", 32,
                "--plans-dir", pipeline["plan"].parent, "--out-dir", out).stdout.split()
    study = json.loads(Path(paths[0]).read_text())
    assert Path(paths[1]).read_bytes()[:8] == PNG_MAGIC
    blocks = [u for u in study["units"] if u["level"] == "block"]
    kinds = [u for u in study["units"] if u["level"] == "kind"]
    assert len(blocks) == 30 and len(kinds) == 7 and all(len(u["tensors"]) == 7 for u in blocks)
    assert all(u["kld"]["mean"] > 0 and u["kld"]["n_windows"] == 2 for u in study["units"])
    block_entropy = study["correlations"]["block"]["entropy_bits"]
    assert -1 <= block_entropy["rho"] <= 1 and block_entropy["n"] == 30 and len(block_entropy["ci"]) == 2
    assert study["correlations"]["block"]["numel"]["rho"] is None  # every block has the same size
    shutil.copy(paths[0], pipeline["results"] / Path(paths[0]).name)


def test_report_from_the_pipeline_results(pipeline, budget_run, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(pipeline["results"], results)
    original = next(results.glob("original_*.json"))
    foreign = json.loads(original.read_text())
    foreign["settings"]["digest"], foreign["settings"]["ppl_windows"] = "000000000000", 4
    foreign["variant"] = "gguf-q8_0"
    (results / "gguf-q8_0_other.json").write_text(json.dumps(foreign))
    report = Path(run("compare_results.py", "--results-dir", results, "--plans-dir", pipeline["plan"].parent,
                      "--out-dir", tmp_path / "report").stdout.split()[-1])
    text = report.read_text()
    for label in ("original", "ewq-bnb-", "gguf-q4_k_m", "gguf-q8_0", "gguf-ewq-", "gguf-f16"):
        assert f"| {label}" in text or f"| **{label}" in text, label
    assert f"gguf-ewq-{budget_run['result']['tag'][:8]}" in text and "budget, error" in text
    assert "`gguf-q8_0_other.json`: other settings: digest, ppl_windows" in text
    assert "± " in text and "Pareto-optimal" in text
    preset_sizes = text.split("## At each llama.cpp preset's size")[1].split("##")[0]  # the plan made for Q4_K_M's bytes
    assert "| gguf-q4_k_m | **gguf-q4_k_m** |" in preset_sizes and "|  | budget, error | " in preset_sizes
    assert "| block | 30 |" in text and "n/a (constant)" in text  # the study copied in by the test above
    # it opens with the answer: at Q4_K_M's size, the lowest KLD of every result at most that large, paired
    from ewq.results.record import read_result

    assert text.index("## The answer") < text.index("| variant | weights MiB |")  # before the summary table
    answer = text.split("## The answer")[1].split("##")[0]
    found = [r for r in map(read_result, results.glob("*.json")) if r and r.kld is not None and r.weight_bytes
             and r.settings["digest"] != "000000000000"]
    q4 = next(r for r in found if r.variant == "gguf-q4_k_m" and not r.tag)
    best = min((r for r in found if r.weight_bytes <= q4.weight_bytes * 1.001), key=lambda r: r.kld.mean)
    line = next(row for row in answer.splitlines() if row.startswith("- at gguf-q4_k_m's size"))
    assert f"**{best.label}" in line and ("itself" in line if best is q4 else "paired over" in line)
    assert "dequantized from a Q4_1 GGUF" in answer  # the default model's caveat
    for png in ("size_vs_kld.png", "mmlu_by_subject.png", "entropy_heatmap.png"):
        assert (report.parent / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in text


def test_report_refuses_a_directory_without_an_original(tmp_path):
    (tmp_path / "r").mkdir()
    assert_usage_error(run("compare_results.py", "--results-dir", tmp_path / "r", "--out-dir", tmp_path / "o",
                           check=False), "no original result")
    assert not (tmp_path / "o").exists()
