"""benchmarks/gpu_check.py's parts on the CPU (no GPU here): its comparison flags what it should, its agreement
part runs the benchmark scripts on both sides, its scale part gives every figure."""
import copy

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import TOLERANCES, compare


def test_the_comparison_passes_a_result_against_itself_and_flags_each_kind_of_disagreement(pipeline):
    original, gguf = pipeline["files"]["original"], pipeline["files"]["gguf-q8_0"]
    assert compare(original, original, TOLERANCES["float32"], gpu=False)["failures"] == []
    same = compare(gguf, gguf, TOLERANCES["llama.cpp"], gpu=False)
    assert same["failures"] == [] and same["nll_rel"] == 0 and same["mmlu_differ"].startswith("0 /")

    skipped = copy.deepcopy(original)  # a window lost on the device (issue 23's back-off bug)
    skipped["metrics"]["perplexity"]["per_window_nll"].pop()
    assert "windows" in compare(original, skipped, TOLERANCES["float32"], gpu=False)["failures"]

    drifted = copy.deepcopy(original)
    drifted["metrics"]["perplexity"]["per_window_nll"][0] *= 1 + 1e-3
    assert compare(original, drifted, TOLERANCES["float32"], gpu=False)["failures"] == ["nll"]
    assert compare(original, drifted, TOLERANCES["half"], gpu=False)["failures"] == []  # within bf16's

    flipped = copy.deepcopy(original)
    answers = flipped["metrics"]["mmlu"]["per_question_correct"]
    for i in range(0, len(answers), 5):  # 20% of the questions
        answers[i] = 1 - answers[i]
    assert compare(original, flipped, TOLERANCES["half"], gpu=False)["failures"] == ["mmlu"]

    doubled = copy.deepcopy(gguf)
    doubled["metrics"]["perplexity"]["kld"]["mean"] *= 2
    assert compare(gguf, doubled, TOLERANCES["llama.cpp"], gpu=False)["failures"] == ["kld"]
    # a GPU run whose memory was not measured is a failure, not a blank cell
    assert "gpu memory" in compare(original, original, TOLERANCES["float32"], gpu=True)["failures"]


def test_the_agreement_part_runs_each_script_on_both_sides(tmp_path, monkeypatch):
    """The float32 original alone (the others take minutes on this CPU): CPU against CPU agrees exactly."""
    real = gpu_check.agreement_runs
    monkeypatch.setattr(gpu_check, "agreement_runs", lambda *args: real(*args)[:1])
    rows = gpu_check.agreement("cpu", tmp_path)
    assert [row["variant"] for row in rows] == ["original float32"]
    assert rows[0]["failures"] == [] and rows[0]["nll_rel"] == 0 and rows[0]["windows"] == "8 / 8"
    assert rows[0]["generations_differ"].startswith("0 /")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plans", "results-cpu", "tiny"]


def test_the_scale_part_gives_every_figure_on_the_cpu(tmp_path):
    figures = gpu_check.scale("cpu", tmp_path)
    assert figures["mmlu q/s batch 1"] > 0 and figures["mmlu q/s batched"] > 0
    differ, n = figures["mmlu answers differ"].split(" / ")
    assert int(n) == 57 and int(differ) <= 1  # one question a subject; batched and batch 1 agree (near-ties aside)
    assert len(figures["kld s/tensor"]) == 3 and all(s > 0 for s in figures["kld s/tensor"].values())
    assert figures["bnb read-back weight bytes"] > 0 and figures["bnb peak GPU allocated bytes"] is None


def test_the_check_refuses_cuda_without_a_gpu_in_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    from conftest import assert_usage_error, run

    result = run("benchmarks.gpu_check", "--out-dir", tmp_path / "w", check=False)
    assert_usage_error(result, "torch sees no GPU")
    assert not (tmp_path / "w").exists()
