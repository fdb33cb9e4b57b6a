"""Size-budget plans: the ladder, the rank-ordered allocation, the scores, and llama.cpp's quantizer in process."""
import json

import numpy as np
import pytest
from gguf import quants

from conftest import tiny_llama
from ewq import plan as plan_mod
from ewq.commands.plan import parse_size
from ewq.errors import UserError
from ewq.llamacpp import quantizers as ggml_quant
from ewq.quant_types import LlamaType as T
from ewq.plan import PlanParams, allocate
from ewq.quant_types import Precision, rank_ladder
from ewq.plan.create import create_plan
from ewq.plan.files import write_plan


def matrix(name, cols, rows=256, entropy=5.0, block=0):
    return plan_mod.TensorEntry(hf_name=name, gguf_name=None, block=block, shape=[rows, cols], dtype="F16",
                                numel=rows * cols, entropy_bits=entropy, std=1.0, max_abs_over_std=4.0,
                                excess_kurtosis=0.0)


def test_ladder_uses_legacy_types_where_k_blocks_do_not_divide_rows():
    assert rank_ladder(1536) == ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"]
    assert rank_ladder(576) == ["Q4_0", "Q5_0", "Q8_0", "F16"]
    assert rank_ladder(48) == ["F16"]  # not even 32-blocks fit


def test_allocation_stays_within_budget_and_follows_the_ranking():
    costs = [[4.5, 5.5, 8.5, 16.0] for _ in range(6)]
    order = [3, 1, 5, 0, 2, 4]
    floor, budget_bits = 6 * 4.5, 6 * 4.5 + 6 * 1.0 + 2 * 3.0 + 0.5
    levels = allocate.rank_rounds(costs, order, budget_bits)
    spent = sum(c[level] for c, level in zip(costs, levels))
    assert floor < spent <= budget_bits and budget_bits - spent < 1.0
    assert [levels[i] for i in order] == [2, 2, 1, 1, 1, 1]  # the two best-ranked got the second lift
    assert allocate.rank_rounds(costs, order, 1e9) == [3] * 6
    with pytest.raises(ValueError):
        allocate.rank_rounds(costs, order, floor - 1)


def test_allocation_fills_with_cheaper_lifts_after_an_expensive_one_does_not_fit():
    costs = [[100.0, 200.0], [1.0, 2.0]]
    assert allocate.rank_rounds(costs, [0, 1], 150.0) == [0, 1]


def test_sizes_parse_with_units_and_refuse_nonsense(tmp_path):
    assert parse_size("98.9MiB") == int(98.9 * 2**20)
    assert parse_size("104MB") == 104_000_000 and parse_size("123") == 123
    for bad in ("ten MB", "-5MB", "0"):
        with pytest.raises(UserError, match="target-size"):
            parse_size(bad)
    with pytest.raises(UserError, match="not found"):
        parse_size(str(tmp_path / "missing.gguf"))


def test_in_process_quantizer_matches_gguf_py_bit_for_bit():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    ours = ggml_quant.quantize(w, T.Q8_0)
    theirs = quants.quantize(w, T.Q8_0.ggml)
    assert np.array_equal(ours, theirs.reshape(ours.shape))


def test_relative_error_falls_along_the_ladder_and_respects_importance():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 512)).astype(np.float32)
    errors = [ggml_quant.relative_error(w, t) for t in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16)]
    assert errors == sorted(errors, reverse=True) and 1e-3 < errors[0] < 3e-2 and errors[-1] < 1e-6
    one_column = np.zeros(512, dtype=np.float32)
    one_column[7] = 1.0
    approx = ggml_quant.round_trip(w, T.Q4_0, one_column)
    expected = ((w[:, 7] - approx[:, 7]) ** 2).sum() / (w[:, 7] ** 2).sum()
    assert ggml_quant.relative_error(w, T.Q4_0, one_column) == pytest.approx(expected, rel=1e-5)
    # llama.cpp's quantizer spends its choice of scales on the important column
    assert expected < 0.5 * ggml_quant.relative_error(w, T.Q4_0)
    with pytest.raises(ValueError, match="do not divide"):
        ggml_quant.quantize(w[:, :100], T.Q4_K)


@pytest.mark.parametrize("score", ["entropy", "error", "random"])
def test_budget_plans_of_a_model_meet_the_budget(tiny_model_dir, tmp_path, score):
    target = 6.0
    plan = create_plan(str(tiny_model_dir), PlanParams(target_bpw=target, score=score, keep_embeddings=False,
                                                       keep_lm_head=False))
    total = sum(t.numel for t in plan.tensors)
    bits = sum(t.numel * t.llama_type.bits_per_weight for t in plan.tensors)
    assert bits / total <= target and plan.budget.gguf.bits_per_weight == pytest.approx(bits / total)
    smallest_lift = min(t.numel for t in plan.tensors if t.is_matrix) * (5.5 - 4.5)
    assert target * total - bits < 3 * smallest_lift * 8  # filled up to within a few small lifts
    ranked = [t for t in plan.tensors if t.reason == f"budget:{score}"]
    assert ranked and all(t.rank_score is not None for t in ranked)
    json_path, _ = write_plan(plan, tmp_path)
    again = plan_mod.load_plan(json_path)
    assert [t.llama_type for t in again.tensors] == [t.llama_type for t in plan.tensors]
    assert again.budget == plan.budget and again.plan_hash == plan.plan_hash


def test_entropy_budget_gives_high_entropy_tensors_at_least_as_many_bits(tiny_model_dir):
    plan = create_plan(str(tiny_model_dir), PlanParams(target_bpw=7.0, keep_embeddings=False, keep_lm_head=False))
    ranked = sorted((t for t in plan.tensors if t.reason == "budget:entropy" and rank_ladder(t.ncols) ==
                     ["Q4_0", "Q5_0", "Q8_0", "F16"]), key=lambda t: -t.entropy_bits)
    rungs = [rank_ladder(t.ncols).index(t.llama_type) for t in ranked]
    assert rungs == sorted(rungs, reverse=True) and rungs[0] > rungs[-1]


def test_bitsandbytes_side_reports_an_unreachable_budget(tmp_path):
    # a large vocabulary: bitsandbytes keeps embedding and head in fp16, so 8 bits/weight is out of its reach
    tiny_llama(num_layers=2, vocab=8192).save_pretrained(tmp_path / "m", safe_serialization=True)
    plan = create_plan(str(tmp_path / "m"), PlanParams(target_bpw=8.0, keep_embeddings=False, keep_lm_head=False))
    assert plan.budget.gguf.bits_per_weight <= 8.0 and plan.budget.bitsandbytes.floor_bits_per_weight > 8
    assert plan.budget.bitsandbytes.meets_budget is False
    assert all(t.precision is Precision.INT4 for t in plan.tensors if t.reason == "budget:entropy"
               and not t.is_embedding_or_head)


def test_budget_below_the_floor_is_a_user_error(tiny_model_dir):
    with pytest.raises(UserError, match="below the GGUF ladder's floor"):
        create_plan(str(tiny_model_dir), PlanParams(target_bpw=3.0))


def test_threshold_plans_keep_their_hash_when_budget_fields_exist():
    params = PlanParams()
    assert plan_mod.plan_hash("abc", params) != plan_mod.plan_hash("abc", PlanParams(target_bpw=5.0))
    assert plan_mod.plan_hash("abc", params) == plan_mod.plan_hash("abc", PlanParams(score="entropy", seed=0))


def test_every_score_goes_through_the_one_optimizer_and_beats_the_ranked_ladder_on_its_own_objective(tiny_model_dir):
    """--allocator optimized (the default of the command): error with α = 1, Σ relative error over the wide
    menu. On that objective the optimizer is at most the ranked ladder's, at
    the same budget, and both fit it."""
    from ewq import weights
    from ewq.plan.create import name_model, read_entries
    from ewq.plan.entries import Allocator
    from ewq.plan.scores import ErrorPredictor

    files = weights.open_model(str(tiny_model_dir))
    common = dict(target_bpw=6.0, score="error", keep_embeddings=False, keep_lm_head=False)
    optimized = create_plan(files, PlanParams(allocator=Allocator.OPTIMIZED, **common))
    ranked = create_plan(files, PlanParams(**common))
    assert ranked.params.allocator is Allocator.RANKED and optimized.params.allocator is Allocator.OPTIMIZED
    assert optimized.plan_hash != ranked.plan_hash
    predictor = ErrorPredictor(None)
    read_entries(files, optimized.params, name_model(files), predictor.observe)

    def objective(plan):  # Σ e_t(q) of the chosen types
        return sum(predictor.gguf_errors[t.hf_name][t.llama_type] for t in plan.tensors if not t.is_kept)

    assert objective(optimized) <= objective(ranked) and objective(optimized) < 0.95 * objective(ranked)
    assert optimized.budget.gguf.predicted_kld == pytest.approx(objective(optimized))
    total = sum(t.numel for t in optimized.tensors)
    assert optimized.budget.gguf.bytes * 8 <= 6.0 * total and ranked.budget.gguf.bits_per_weight <= 6.0
    ladder = {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "Q4_0", "Q5_0"}
    assert {t.llama_type.value for t in optimized.tensors if not t.is_kept} - ladder  # the wide menu is used
    for score in ("entropy", "random"):  # the same form for every score
        plan = create_plan(files, PlanParams(allocator=Allocator.OPTIMIZED, **{**common, "score": score}))
        assert plan.budget.gguf.predicted_kld > 0 and plan.budget.gguf.bytes * 8 <= 6.0 * total


def test_the_pr15550_score_weighs_each_error_by_rows_and_kind_as_that_pr_does(tiny_model_dir):
    """--score pr15550: α_t = rows_t × boost (ffn_down 6, attn_v 1.25, a tied embedding 2.5, others 1); the
    plan's predicted sum is that objective at its chosen types, and it allocates otherwise than α = 1."""
    # the tiny Llama has an output head of its own (3) and so an untied embedding (1)
    from ewq import weights
    from ewq.plan.create import name_model, read_entries
    from ewq.plan.scores import PR15550_BOOST, Pr15550Predictor

    files = weights.open_model(str(tiny_model_dir))
    common = dict(target_bpw=6.0, keep_embeddings=False, keep_lm_head=False)
    plan = create_plan(files, PlanParams(score="pr15550", **common))
    error_plan = create_plan(files, PlanParams(score="error", **common))
    predictor = Pr15550Predictor(None)
    read_entries(files, plan.params, name_model(files), predictor.observe)
    ranked = [t for t in plan.tensors if not t.is_kept]
    alpha = predictor.alpha(ranked, {}, {})
    by_kind = {}
    for t in ranked:
        kind = "output" if t.gguf_name == "output.weight" else next(
            (k for k in ("ffn_down", "attn_v", "token_embd") if k in t.gguf_name), "other")
        by_kind.setdefault(kind, set()).add(alpha[t.hf_name] / t.shape[0])
    tied = not any(t.is_lm_head for t in plan.tensors)
    assert by_kind == {"ffn_down": {PR15550_BOOST["ffn_down"]}, "attn_v": {PR15550_BOOST["attn_v"]},
                       "token_embd": {PR15550_BOOST["tied_embedding"] if tied else 1.0}, "other": {1.0},
                       **({} if tied else {"output": {PR15550_BOOST["output"]}})}
    objective = sum(alpha[t.hf_name] * predictor.gguf_errors[t.hf_name][t.llama_type] for t in ranked)
    assert plan.budget.gguf.predicted_kld == pytest.approx(objective)
    assert plan.budget.gguf.bytes * 8 <= 6.0 * sum(t.numel for t in plan.tensors)
    assert [t.llama_type for t in plan.tensors] != [t.llama_type for t in error_plan.tensors]
    with pytest.raises(UserError, match="no ranked form"):
        create_plan(files, PlanParams(score="pr15550", allocator="ranked", **common))


def test_a_budget_plan_written_before_the_allocator_existed_keeps_its_hash_and_its_ranked_ladder(tiny_model_dir, tmp_path):
    from ewq.plan.entries import Allocator

    plan = create_plan(str(tiny_model_dir), PlanParams(target_bpw=6.0, score="entropy", keep_embeddings=False,
                                                       keep_lm_head=False))
    json_path, _ = write_plan(plan, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["params"].pop("allocator") == "ranked"
    json_path.write_text(json.dumps(data))  # as such a plan was written
    again = plan_mod.load_plan(json_path)
    assert again.params.allocator is Allocator.RANKED and again.plan_hash == plan.plan_hash
    kld = PlanParams(target_bpw=6.0, score="kld")
    assert kld.allocator is Allocator.OPTIMIZED  # how kld plans were always made: their hash is unchanged
    assert plan_mod.plan_hash("m", kld) == plan_mod.plan_hash("m", PlanParams(target_bpw=6.0, score="kld",
                                                                              allocator=Allocator.OPTIMIZED))
    assert PlanParams(allocator=Allocator.OPTIMIZED).allocator is None  # the threshold rule allocates nothing


def test_the_distortion_table_is_measured_once_per_model_and_imatrix(tiny_model_dir, tmp_path, monkeypatch):
    """A plan at another budget, or by another score, reads the errors back: with llama.cpp's and
    bitsandbytes' round trips made to fail it still gives the types of a plan measured afresh. A refused
    budget writes nothing; a tensor whose cached options are not its menu is measured again."""
    from ewq import weights
    from ewq.plan import distortion

    files = weights.open_model(str(tiny_model_dir))
    common = dict(keep_embeddings=False, keep_lm_head=False, allocator="optimized")  # the command's default
    cache = tmp_path / "plans"
    with pytest.raises(UserError):  # far below the floor: refused before anything is written
        create_plan(files, PlanParams(target_bpw=1.0, score="error", **common), cache_dir=cache)
    assert not cache.exists()
    create_plan(files, PlanParams(target_bpw=6.0, score="error", **common), cache_dir=cache)
    [table] = cache.glob("distortion_*.json")
    fresh = {score: create_plan(files, PlanParams(target_bpw=5.0, score=score, **common))
             for score in ("error", "pr15550")}
    real = distortion.gguf_errors
    calls = []

    def measured_again(entry, values, imatrix):
        calls.append(entry.hf_name)
        return real(entry, values, imatrix)

    def refuse(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(distortion, "gguf_errors", refuse)
    monkeypatch.setattr(distortion, "bnb_errors", refuse)
    for score, plan in fresh.items():
        again = create_plan(files, PlanParams(target_bpw=5.0, score=score, **common), cache_dir=cache)
        assert [t.llama_type for t in again.tensors] == [t.llama_type for t in plan.tensors]
        assert again.budget.gguf.predicted_kld == plan.budget.gguf.predicted_kld
    data = json.loads(table.read_text())
    stale = next(iter(data["gguf"]))
    data["gguf"][stale].pop("Q8_0")  # as if the menu had gained a type since
    table.write_text(json.dumps(data))
    monkeypatch.setattr(distortion, "gguf_errors", measured_again)
    create_plan(files, PlanParams(target_bpw=5.0, score="error", **common), cache_dir=cache)
    assert calls == [stale] and "Q8_0" in json.loads(table.read_text())["gguf"][stale]


def test_a_round_trip_in_chunks_of_rows_is_the_whole_matrix_quantized_at_once(monkeypatch):
    """llama.cpp quantizes rows independently (with and without an importance vector): chunks of rows give
    the very values of one call, and the per-row error sums are the whole matrix's."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((96, 512)).astype(np.float32)
    importance = rng.uniform(0.1, 3.0, 512).astype(np.float32)
    whole = {t: ggml_quant.round_trip(w, t, importance) for t in (T.Q4_K, T.IQ4_XS, T.Q5_0, T.Q8_0)}
    monkeypatch.setattr(ggml_quant, "CHUNK_WEIGHTS", 7 * 512)  # 7 rows a chunk, the last one short
    assert len(ggml_quant.row_chunks(96, 512)) == 14
    for t, expected in whole.items():
        assert np.array_equal(ggml_quant.round_trip(w, t, importance), expected), t
        error, energy = ggml_quant.quantization_row_errors(w, t, importance)
        assert error.shape == (96,)
        assert error.sum() / energy.sum() == pytest.approx(ggml_quant.weighted_error(w, expected, importance), rel=1e-12)


def test_a_large_tensors_errors_come_from_a_sample_of_rows_within_their_stated_error(monkeypatch):
    """Above SAMPLE_ABOVE weights e_t(q) is estimated on seeded whole rows: fewer rows than the tensor's,
    the same rows on every call, each estimate within 4 of its stated SEs of the exact error of the whole
    matrix, and a tensor at or below the threshold measured exactly (no SE)."""
    import torch

    from ewq.plan import distortion

    rows, cols = 2048, 256
    rng = np.random.default_rng(11)
    # rows of unequal scale and shape, so that the per-row errors vary as a real tensor's do
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.2, 2.0, (rows, 1))
         * (1 + 3 * (rng.random((rows, cols)) < 0.01))).astype(np.float32)
    entry = matrix("model.layers.0.mlp.up_proj.weight", cols, rows=rows)
    monkeypatch.setattr(distortion, "SAMPLE_ABOVE", rows * cols - 1)
    monkeypatch.setattr(distortion, "SAMPLE_WEIGHTS", 256 * cols)
    picked = distortion.sampled_rows(entry)
    assert len(picked) == 256 and np.array_equal(picked, distortion.sampled_rows(entry))
    assert np.all(np.diff(picked) > 0)
    estimate = distortion.gguf_errors(entry, torch.from_numpy(w), None)
    assert (estimate.rows, estimate.of) == (256, rows) and estimate.sample["rows"] == 256
    for t, e in estimate.errors.items():
        exact = ggml_quant.relative_error(w, t)
        se = estimate.relative_se[t.value] * e
        assert se > 0 and abs(e - exact) <= 4 * se, (t, e, exact, se)
        assert estimate.relative_se[t.value] < 0.1
    monkeypatch.setattr(distortion, "SAMPLE_ABOVE", rows * cols)
    whole = distortion.gguf_errors(entry, torch.from_numpy(w), None)
    assert whole.rows is None and whole.sample is None
    assert whole.errors[T.Q4_K] == pytest.approx(ggml_quant.relative_error(w, T.Q4_K), rel=1e-12)


def test_the_distortion_table_records_which_tensors_were_sampled_and_gives_it_back(tiny_model_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    from ewq import weights
    from ewq.plan import distortion

    monkeypatch.setattr(distortion, "SAMPLE_ABOVE", 128 * 64 - 1)  # the tiny model's 256 x 64 MLP matrices
    monkeypatch.setattr(distortion, "SAMPLE_WEIGHTS", 64 * 64)
    files = weights.open_model(str(tiny_model_dir))
    params = PlanParams(target_bpw=5.0, score="error", keep_embeddings=False, keep_lm_head=False, allocator="optimized")
    create_plan(files, params, cache_dir=tmp_path)
    assert "from a seeded sample of whole rows" in capsys.readouterr().err
    [table] = tmp_path.glob("distortion_*.json")
    sampled = json.loads(table.read_text())["sampled"]["gguf"]
    assert sampled and all(s["rows"] < s["of"] and max(s["relative_se"].values()) > 0 for s in sampled.values())
    cache = distortion.DistortionCache.open(tmp_path, weights.model_hash(files), None)
    name = next(iter(sampled))
    entry = next(t for t in create_plan(files, params).tensors if t.hf_name == name)
    again = cache.gguf_errors(entry, None, None)  # from the file: nothing is quantized
    assert cache.reused == 1 and again.sample == sampled[name]
