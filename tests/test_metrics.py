import math
import random

import numpy as np
import pytest
import torch

from conftest import BigramBackend
from ewq.data import mmlu as mmlu_data
from ewq.data.prompts import Request, Task
from ewq.errors import UserError
from ewq.metrics import generation, mmlu, perplexity, stats, textsim
from ewq.metrics.stats import bootstrap_se, mean_se, paired_difference, paired_ratio, percentile, proportion_se


def test_mean_se_hand_checked():
    result = mean_se([1.0, 2.0, 3.0, 4.0])
    assert result.mean == 2.5 and result.n == 4
    assert result.se == pytest.approx(math.sqrt((1.5**2 * 2 + 0.5**2 * 2) / 3 / 4))
    assert mean_se([5.0]).se is None and mean_se([]).mean is None


def test_proportion_and_paired_difference():
    assert proportion_se(30, 120).to_json() == {"mean": 0.25, "se": pytest.approx(math.sqrt(0.25 * 0.75 / 120)), "n": 120}
    diff = paired_difference([1, 0, 1, 1], [1, 1, 1, 1])
    assert diff.mean == -0.25 and diff.se == pytest.approx(0.25) and diff.significant_2se is False
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_paired_ratio_cancels_what_the_items_share():
    """Items that differ a lot among themselves (texts of varying difficulty) but whose variant / reference
    ratio is steady: the paired ratio's SE is small, and matches a bootstrap of the ratio of means."""
    rng = np.random.default_rng(0)
    reference = rng.lognormal(size=300)
    variant = 0.6 * reference * rng.normal(1.0, 0.05, size=300)
    ratio = paired_ratio(list(variant), list(reference))
    assert ratio.mean == pytest.approx(variant.mean() / reference.mean()) and ratio.n == 300
    pairs = list(zip(variant, reference))
    boot = bootstrap_se(pairs, lambda s: sum(v for v, _ in s) / sum(r for _, r in s), rounds=400)
    assert ratio.se == pytest.approx(boot, rel=0.2)
    unpaired = ratio.mean * math.hypot(mean_se(list(variant)).se / variant.mean(), mean_se(list(reference)).se / reference.mean())
    assert ratio.se < unpaired / 5
    assert paired_ratio([1.0], [0.0]).mean is None
    with pytest.raises(ValueError):
        paired_ratio([1, 2], [1])


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0, 10], 99) == pytest.approx(9.9)


def test_bootstrap_se_of_a_mean_is_close_to_the_analytic_se():
    values = list(np.random.default_rng(0).normal(size=400))
    assert bootstrap_se(values, lambda s: sum(s) / len(s), rounds=400) == pytest.approx(mean_se(values).se, rel=0.15)


SPEC = perplexity.WindowSpec(context=16, stride=8, max_windows=10, kld_windows=4)


def manual_nll(backend, tokens, spec):
    values = []
    for start in perplexity.window_starts(len(tokens), spec):
        for position in range(start + spec.context - spec.stride, start + spec.context):
            values.append(-float(backend.table[tokens[position - 1], tokens[position]]))
    return values


def test_window_layout():
    assert perplexity.window_starts(40, SPEC) == [0, 8, 16, 24]
    assert perplexity.window_starts(1000, SPEC) == [8 * i for i in range(10)]
    with pytest.raises(UserError, match="fewer than one window"):
        perplexity.window_starts(10, SPEC)


def test_perplexity_equals_the_hand_computed_value():
    backend = BigramBackend()
    tokens = list(np.random.default_rng(1).integers(0, 32, size=200))
    result = perplexity.evaluate(backend, tokens, SPEC)
    nll = manual_nll(backend, tokens, SPEC)
    assert result["ppl"]["n_tokens"] == len(nll) == 80
    assert result["ppl"]["value"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-9)


def test_kld_is_zero_against_itself_and_matches_the_definition(tmp_path):
    reference_backend, other = BigramBackend(seed=0), BigramBackend(seed=0)
    other.table = torch.log_softmax(other.table + 0.3 * torch.randn(32, 32, generator=torch.Generator().manual_seed(9)), -1)
    tokens = list(np.random.default_rng(2).integers(0, 32, size=200))
    n_tokens = SPEC.kld_windows * SPEC.stride
    record = perplexity.open_record(tmp_path / "ref.npy", n_tokens, 32)
    perplexity.evaluate(reference_backend, tokens, SPEC, record=record)
    record.flush()
    stored = perplexity.open_reference(tmp_path / "ref.npy", n_tokens)
    same = perplexity.evaluate(reference_backend, tokens, SPEC, reference=stored)
    assert abs(same["kld"]["mean"]) < 1e-3 and same["same_top1"]["mean"] == 1.0
    moved = perplexity.evaluate(other, tokens, SPEC, reference=stored)
    expected, unrounded = [], []  # the stored float16 log-probs, renormalized; the reference before rounding
    for start in perplexity.window_starts(len(tokens), SPEC)[: SPEC.kld_windows]:
        for position in range(start + SPEC.context - SPEC.stride, start + SPEC.context):
            exact = reference_backend.table[tokens[position - 1]].double()
            p = torch.log_softmax(torch.from_numpy(exact.numpy().astype(np.float16)).double(), -1)
            q = other.table[tokens[position - 1]].double()
            expected.append(float((p.exp() * (p - q)).sum()))
            unrounded.append(float((exact.exp() * (exact - q)).sum()))
    assert moved["kld"]["n_tokens"] == n_tokens
    assert moved["kld"]["mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert moved["kld"]["mean"] == pytest.approx(sum(unrounded) / len(unrounded), rel=1e-3)
    assert moved["kld"]["mean"] > 0.01 and moved["kld"]["se"] > 0
    assert 0 < moved["same_top1"]["mean"] < 1


def test_bleu_and_rouge_on_identical_and_disjoint_text():
    same = ["the cat sat on the mat today", "a quick brown fox jumps over it"]
    assert textsim.bleu(same, same)["score"] == pytest.approx(100.0)
    assert textsim.rouge(same, same)["rougeL"]["mean"] == pytest.approx(1.0)
    assert textsim.rouge(same, ["zebra yak", "quartz plinth"])["rouge1"]["mean"] == 0.0


class Tok:
    """A tokenizer stub for the letter and prompt paths: one token per character."""

    chat_template = None
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 32 for c in text]

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in tokens)


class LetterTok(Tok):
    """' A'..' D' are tokens 1..4; other text one token per character (ids from 5)."""

    def encode(self, text, add_special_tokens=False):
        if text in (" A", " B", " C", " D"):
            return [1 + "ABCD".index(text[1])]
        return [5 + ord(c) % 27 for c in text]


class PrefersC(BigramBackend):
    def next_token_logprobs(self, prompts, token_ids):
        scores = torch.full((len(prompts), 32), -10.0)
        scores[:, 3] = -0.1  # ' C'
        return scores[:, token_ids]


def test_mmlu_scores_the_letter_with_the_highest_log_probability():
    answers = [2, 2, 0, 1, 2, 3, 2, 0]
    questions = [mmlu_data.Question("algebra" if i < 4 else "law", f"q{i}?", ("w", "x", "y", "z"), a)
                 for i, a in enumerate(answers)]
    prompts = [LetterTok().encode(mmlu_data.prompt(q, [])) for q in questions]
    result = mmlu.evaluate(PrefersC(), LetterTok(), questions, prompts)
    assert result["per_question_correct"] == [int(a == 2) for a in answers]
    assert result["accuracy"]["mean"] == 4 / 8 and result["accuracy"]["n"] == 8
    assert result["per_subject"]["algebra"]["mean"] == 0.5 and result["per_subject"]["law"]["mean"] == 0.5
    with pytest.raises(UserError, match="splits"):  # ' A' is two characters, two tokens for this stub
        mmlu.evaluate(PrefersC(), Tok(), questions, prompts)


class CountsRequests(BigramBackend):
    calls = 0

    def generate_greedy(self, prompt, max_new_tokens):
        self.calls += 1
        return super().generate_greedy(prompt, max_new_tokens)


def test_generation_speed_and_quality_fields():
    backend = CountsRequests(vocab=32)
    requests = [Request(Task.CODE, "abc"), Request(Task.CODE, "xy"),
                Request(Task.SUMMARIZATION, "defg", reference="some reference text")]
    prompts = [generation.prompt_tokens(Tok(), r) for r in requests]
    result = generation.evaluate(backend, Tok(), requests, prompts, max_new_tokens=5, timed_per_task=1)
    assert result["n_requests"] == 3 and len(result["outputs"]) == 3
    assert result["n_timed"] == 2 and result["prompt_tokens"]["n"] == 2  # the first code request, the summary
    assert result["decode_tokens_per_s"]["value"] == pytest.approx(4 / 0.004)
    assert result["ttft_s"]["p50"] == pytest.approx(0.01)
    assert result["summarization"]["bleu"]["n"] == 1
    assert backend.calls == 1 + 2 + 1  # warm-up, the timed two, the third (the timed ones' tokens are reused)
    saved = []
    generation.evaluate(backend, Tok(), requests, prompts, max_new_tokens=5, timed_per_task=1,
                        on_progress=lambda runs: saved.append(runs))
    assert [run["request"] for run in saved[-1]] == [0, 2]
    backend.calls = 0  # resumed after the first timed request; a checkpoint without indices decodes again
    resumed = generation.evaluate(backend, Tok(), requests, prompts, max_new_tokens=5, timed_per_task=1,
                                  done=saved[0])
    assert backend.calls == 1 + 1 + 1 and resumed["outputs"] == result["outputs"]
    old_layout = [{k: v for k, v in run.items() if k != "request"} for run in saved[-1]]
    backend.calls = 0
    generation.evaluate(backend, Tok(), requests, prompts, max_new_tokens=5, timed_per_task=1, done=old_layout)
    assert backend.calls == 1 + 2 + 1
    expected = [generation.visible_text(Tok(), backend.generate_greedy(p, 5).tokens) for p in prompts]
    assert [o["text"] for o in result["outputs"]] == expected
    again = generation.evaluate(backend, Tok(), requests, prompts, max_new_tokens=5, timed_per_task=1,
                                reference_outputs=[o["text"] for o in result["outputs"]])
    assert again["rougeL_vs_original"]["mean"] == pytest.approx(1.0) or all(not o["text"] for o in result["outputs"])


def test_zero_kld_windows_gives_perplexity_without_kld():
    spec = perplexity.WindowSpec(context=16, stride=8, max_windows=10, kld_windows=0)
    tokens = list(np.random.default_rng(3).integers(0, 32, size=200))
    result = perplexity.evaluate(BigramBackend(), tokens, spec, reference=np.zeros((0, 32), dtype=np.float16))
    assert "kld" not in result and result["ppl"]["n_windows"] == 10


def test_spearman_on_known_orders_ties_and_constants():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert stats.ranks([5, 1, 5, 3]) == [3.5, 1.0, 3.5, 2.0]
    # hand-computed: ranks x = 1..5, y = 2,1,4,3,5 -> rho = 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*4/120 = 0.8
    assert stats.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert stats.spearman([1, 1, 1], [1, 2, 3]) is None


def test_spearman_bootstrap_interval_contains_rho_and_excludes_zero_only_for_a_strong_relation():
    rng = random.Random(3)
    x = [rng.random() for _ in range(30)]
    strong = stats.spearman_bootstrap(x, [v + 0.05 * rng.random() for v in x])
    assert strong["ci"][0] <= strong["rho"] <= strong["ci"][1] and strong["ci_excludes_zero"]
    noise = stats.spearman_bootstrap(x, [rng.random() for _ in x])
    assert noise["ci"][0] < 0 < noise["ci"][1] and not noise["ci_excludes_zero"]
    assert stats.spearman_bootstrap([1, 1, 1], [1, 2, 3])["ci"] is None


class RunsOutOfMemory(BigramBackend):
    """The fake engine with auto batching that runs out of memory above `limit` windows a batch."""

    def __init__(self, limit, **kwargs):
        super().__init__(**kwargs)
        self.limit, self.auto_batch, self.batch_size = limit, True, 16

    def window_logprobs(self, windows, rows):
        def run(batch):
            if len(batch) > self.limit:
                raise torch.OutOfMemoryError("injected")
            return BigramBackend.window_logprobs(self, batch, rows)

        return self.in_batches(windows, run)


def test_an_out_of_memory_halving_scores_every_window_once_with_the_numbers_of_a_run_without_it(tmp_path):
    """Issue 23, 1: the loop stepped by the first batch size while the backend halved it, so windows were
    skipped (16 of 40 scored) and KLD reference rows beyond the first batch stayed zero."""
    spec = perplexity.WindowSpec(context=16, stride=8, max_windows=40, kld_windows=40)
    tokens = list(np.random.default_rng(3).integers(0, 32, size=400))
    plain = BigramBackend(seed=0)  # batch 1: no back-off
    record = perplexity.open_record(tmp_path / "ref.npy", 40 * 8, 32)
    expected = perplexity.evaluate(plain, tokens, spec, record=record)
    record.flush()
    halving, halving_record = RunsOutOfMemory(limit=3, seed=0), perplexity.open_record(tmp_path / "r2.npy", 40 * 8, 32)
    got = perplexity.evaluate(halving, tokens, spec, record=halving_record)
    assert halving.batch_size == 2  # 16 -> 8 -> 4 -> 2
    assert got["ppl"]["n_windows"] == len(got["per_window_nll"]) == 40
    assert got["per_window_nll"] == pytest.approx(expected["per_window_nll"], abs=1e-12)
    assert np.array_equal(np.asarray(halving_record), np.asarray(record))  # every reference row written
    other = BigramBackend(seed=1)
    stored = perplexity.open_reference(tmp_path / "ref.npy", 40 * 8)
    compared = perplexity.evaluate(RunsOutOfMemory(limit=5, seed=1), tokens, spec, reference=stored)
    assert compared["per_window_kld"] == pytest.approx(perplexity.evaluate(other, tokens, spec,
                                                                           reference=stored)["per_window_kld"])
    assert compared["kld"]["n_windows"] == 40 and compared["kld"]["n_tokens"] == 320
