"""The comparison report: benchmark JSON files -> one markdown page and its PNG figures.

Only results that share the original's model hash and evaluation settings are compared; every
other file is listed with the reason it was left out. Deltas are paired where the items are
shared (per-window NLL and KLD, per-question MMLU correctness) and unpaired otherwise (BLEU,
ROUGE, speed), and a delta within two standard errors is marked "n.s." (not significant).
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from .. import assets
from ..errors import UserError
from ..metrics.stats import paired_difference
from ..results.estimate import Estimate
from ..plan.entries import Allocator, PlanParams, Score
from ..plan.files import find_plan, load_plan
from ..fileio import ensure_writable_dir, write_text_atomic
from ..results.record import LLAMA_CPP_PRESETS, Result, Variant
from ..study import PREDICTORS, StudyFile, tensor_kind
from ..twin import twin_of
from . import plots

MIB = 2**20


def load_results(results_dir: Path) -> tuple[list[Result], list[StudyFile]]:
    """Benchmark results and sensitivity studies found in results_dir; unreadable files are skipped."""
    if not results_dir.is_dir():
        raise UserError(f"results directory not found: {results_dir}")
    found, studies = [], []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        study = StudyFile.from_json(data)
        if study is not None:
            studies.append(study)
        elif Result.is_result(data):
            found.append(Result(data, path))
    return found, studies


def pick_reference(found: list[Result], model_hash: str | None, digest: str | None) -> Result:
    originals = [r for r in found if r.is_original
                 and (model_hash is None or r.model_hash == model_hash)
                 and (digest is None or r.settings_digest == digest)]
    if not originals:
        raise UserError("no original result to compare against (run benchmark_original.py with the same settings)")
    return max(originals, key=lambda r: r.created_utc)


def comparable(found: list[Result], reference: Result) -> tuple[list[Result], list[tuple[Result, str]]]:
    keep, left_out = [], []
    for r in found:
        if r.model_hash != reference.model_hash:
            left_out.append((r, f"other model hash {r.model_hash}"))
        elif r.settings_digest != reference.settings_digest:
            differing = sorted(k for k in reference.settings if r.settings.get(k) != reference.settings[k])
            left_out.append((r, "other settings: " + ", ".join(differing)))
        elif r.tokens_digest != reference.tokens_digest:
            left_out.append((r, "other evaluation tokens (text or tokenizer changed)"))
        else:
            keep.append(r)
    keep.sort(key=lambda r: (r is not reference, -(r.bits_per_weight or 0)))
    return keep, left_out


# --- numbers -> cells ------------------------------------------------------------------------

def fmt(value, digits: int = 3, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value * scale:.{digits}f}"


def with_se(stat: Estimate | None, digits: int = 3, scale: float = 1.0) -> str:
    if stat is None or stat.mean is None:
        return "–"
    return fmt(stat.mean, digits, scale) + ("" if stat.se is None else f" ± {fmt(stat.se, digits, scale)}")


def flag(delta: float | None, se: float | None) -> str:
    """' (n.s.)' when the difference is within 2 SE of zero."""
    if delta is None or se is None:
        return ""
    return " (n.s.)" if abs(delta) < 2 * se else ""


def pct_change(value, base) -> str:
    if value is None or not base:
        return "–"
    return f"{100 * (value / base - 1):+.1f}%"


def unpaired(a: Estimate | None, b: Estimate | None) -> tuple[float | None, float | None]:
    if a is None or b is None:
        return None, None
    if a.se is None or b.se is None:
        return a.mean - b.mean, None
    return a.mean - b.mean, math.hypot(a.se, b.se)


def paired(a: list[float] | None, b: list[float] | None) -> Estimate | None:
    """The paired difference of two results' per-item values (windows, questions), if both have them."""
    if not a or not b or len(a) != len(b):
        return None
    return paired_difference(a, b)


# --- the tables ------------------------------------------------------------------------------

def summary_rows(rows: list[Result], ref: Result) -> list[list[str]]:
    table = []
    for r in rows:
        is_ref = r is ref
        nll = None if is_ref else paired(r.per_window_nll, ref.per_window_nll)
        ppl_cell = with_se(r.ppl)
        if nll:
            ppl_cell += f" ({100 * (math.exp(nll.mean) - 1):+.2f}%{flag(nll.mean, nll.se)})"
        acc = r.mmlu_accuracy
        acc_cell = with_se(acc, 1, 100)
        mmlu_delta = None if is_ref else paired(r.per_question_correct, ref.per_question_correct)
        if mmlu_delta and acc:
            acc_cell += f" ({100 * mmlu_delta.mean:+.1f} ± {100 * mmlu_delta.se:.1f} pts" \
                        f"{flag(mmlu_delta.mean, mmlu_delta.se)}, n={acc.n})"
        elif acc:
            acc_cell += f" (n={acc.n})"
        bleu_cell = with_se(r.bleu, 2)
        if not is_ref and r.bleu:
            bleu_cell += flag(*unpaired(r.bleu, ref.bleu))
        rouge = r.rouge
        speed = r.decode_tokens_per_s
        peak = r.peak_memory_bytes
        table.append([
            f"**{r.label}**" if is_ref else r.label,
            fmt((r.weight_bytes or 0) / MIB, 1),
            fmt(r.bits_per_weight, 2),
            "–" if is_ref else pct_change(r.weight_bytes, ref.weight_bytes),
            fmt(peak / MIB if peak else None, 0),
            fmt(speed, 1) + ("" if is_ref or speed is None else f" ({pct_change(speed, ref.decode_tokens_per_s)})"),
            fmt(r.latency_p50_s, 2),
            ppl_cell,
            "ref" if is_ref else with_se(r.kld, 4),
            "ref" if is_ref else with_se(r.same_top1, 1, 100),
            acc_cell,
            bleu_cell,
            "/".join(fmt(rouge[k].mean if rouge.get(k) else None, 3) for k in ("rouge1", "rouge2", "rougeL"))
            if rouge else "–",
            "ref" if is_ref else with_se(r.rougeL_vs_original, 3),
            r.settings.get("device", "–"),
        ])
    return table


SUMMARY_HEADER = ["variant", "weights MiB", "bpw", "size vs orig", "peak mem MiB", "decode tok/s", "latency p50 s",
                  "ppl ± SE (vs orig)", "KLD ± SE", "same top-1 %", "MMLU % ± SE (Δ paired)", "BLEU ± SE",
                  "ROUGE-1/2/L", "ROUGE-L vs orig", "device"]


def kld_vs_baseline_rows(rows: list[Result], baseline: Result) -> list[list[str]]:
    """Paired KLD difference per window against a baseline variant (same windows, same reference)."""
    table = []
    for r in rows:
        kld = r.kld
        if kld is None:
            continue
        diff = None if r is baseline else paired(r.per_window_kld, baseline.per_window_kld)
        table.append([
            f"**{r.label}**" if r is baseline else r.label,
            fmt((r.weight_bytes or 0) / MIB, 2),
            fmt(r.bits_per_weight, 3),
            plan_score(r),
            with_se(kld, 4),
            "baseline" if diff is None else f"{diff.mean:+.4f} ± {diff.se:.4f}{flag(diff.mean, diff.se)}",
            with_se(r.same_top1, 1, 100),
            str(kld.n),
        ])
    return table


def preset_size_rows(rows: list[Result]) -> list[list[str]]:
    """At each llama.cpp preset's size that has plans, the preset and every size-budget plan made for
    exactly its tensor bytes (`--target-size` of its file), KLD paired per window against that preset."""
    table = []
    for variant in LLAMA_CPP_PRESETS:
        preset = next((r for r in rows if r.variant == variant.value and not r.tag and r.kld is not None), None)
        if preset is None:
            continue
        plans = [r for r in rows if r.kld is not None and r.plan_file
                 and getattr(_plan_params(r.plan_file), "target_bytes", None) == preset.weight_bytes]
        if not plans:
            continue
        for r in [preset] + sorted(plans, key=lambda r: r.kld.mean):
            diff = None if r is preset else paired(r.per_window_kld, preset.per_window_kld)
            table.append([
                preset.label if r is preset else "",
                f"**{r.label}**" if r is preset else plan_score(r),
                f"{r.weight_bytes:,}" if r.weight_bytes else "–",
                with_se(r.kld, 5),
                "–" if diff is None else
                f"{diff.mean:+.5f} ± {diff.se:.5f} ({100 * diff.mean / preset.kld.mean:+.0f}%){flag(diff.mean, diff.se)}",
                with_se(r.same_top1, 1, 100),
                pct_change(r.ppl.mean if r.ppl else None, preset.ppl.mean if preset.ppl else None),
            ])
    return table


def answer_lines(rows: list[Result], reference: Result) -> list[str]:
    """The report's first lines: at each llama.cpp preset's size, the variant with the lowest KLD among those
    at most that large (within SAME_SIZE), by how much it beats the preset (paired per window, SE, n), then
    the baseline's caveat."""
    lines = []
    for variant in LLAMA_CPP_PRESETS:
        preset = next((r for r in rows if r.variant == variant.value and not r.tag and r.kld is not None), None)
        if preset is None or not preset.weight_bytes:
            continue
        fits = [r for r in rows if r.kld is not None and r.weight_bytes
                and r.weight_bytes <= preset.weight_bytes * (1 + SAME_SIZE)]
        best = min(fits, key=lambda r: r.kld.mean)
        size = f"at {preset.label}'s size ({preset.weight_bytes / MIB:.1f} MiB of weights)"
        if best is preset:
            lines.append(f"- {size}: **{preset.label} itself** (KLD {with_se(preset.kld, 4)}); "
                         f"no variant at most as large has a lower KLD.")
            continue
        diff = paired(best.per_window_kld, preset.per_window_kld)
        by = ("" if diff is None else f", {diff.mean:+.4f} ± {diff.se:.4f} paired over {diff.n} windows "
              f"({100 * diff.mean / preset.kld.mean:+.0f}%){flag(diff.mean, diff.se)}")
        lines.append(f"- {size}: **{best.label}** ({plan_score(best)}, {best.weight_bytes / MIB:.1f} MiB): KLD "
                     f"{with_se(best.kld, 4)} against {preset.label}'s {with_se(preset.kld, 4)}{by}.")
    if not lines:
        return []
    return ["## The answer", "", "Which variant is best at each size (KL divergence to the original, the figure "
            "that decides between variants):", "", *lines, "", baseline_caveat(reference.model), ""]


def baseline_caveat(model: str) -> str:
    """What the original is, for the default model and its twin: both carry the Q4_1 GGUF's error."""
    twin = twin_of(model)
    if twin and Path(twin["source"]).resolve() == Path(assets.default_model()).resolve():
        return ("The original here is the rotated twin of the offline default model (seed "
                f"{twin['seed']}, {twin['dtype']}): its residual stream turned by a random orthogonal matrix, the "
                "norms folded in, so it computes the default model's function with its matrices on no quantization "
                "grid, favouring no type. That function was dequantized from a Q4_1 GGUF, so the baseline carries "
                "4-bit error: read the figures as what further quantization costs this model.")
    if Path(model).resolve() == Path(assets.default_model()).resolve():
        return ("The original here is the offline default model, dequantized from a Q4_1 GGUF: its baseline "
                "already carries 4-bit error and its matrices lie on Q4_1's grid, which favours Q4_1-like types; "
                "read the figures as what further quantization costs this model.")
    return f"Figures for {model} only, against the original as the benchmark loaded it."


@lru_cache(maxsize=None)
def _plan_params(plan_file: str) -> PlanParams | None:
    """The params of a plan file, read once per report; None if it is gone or unreadable."""
    try:
        return load_plan(Path(plan_file)).params
    except UserError:
        return None


def plan_score(r: Result) -> str:
    """How the plan behind a result ranked tensors, read from the plan file it names."""
    plan_file = r.plan_file
    if not plan_file:
        return "–"
    params = _plan_params(plan_file)
    if params is None:
        return "plan file missing or unreadable"
    if not params.is_budget:
        return "entropy thresholds"
    ranked = " (ranked ladder)" if params.allocator is Allocator.RANKED and params.score is not Score.KLD else ""
    return f"budget, {params.score.value}{ranked}" + (f" (seed {params.seed})" if params.score is Score.RANDOM else "")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


SAME_SIZE = 1e-3  # sizes within 0.1% count as equal on the Pareto front (budget plans land a few KB under)


def series(r: Result) -> str:
    """The line a result belongs to in the size-vs-KLD figure: llama.cpp's presets, or a plan's score."""
    if r.variant in {v.value for v in LLAMA_CPP_PRESETS}:
        return "llama.cpp presets"
    how = plan_score(r)
    return r.label if how == "–" else how.split(" (seed")[0]  # random plans of every seed on one line


def pareto_points(rows: list[Result]) -> list[dict]:
    points = []
    for r in rows:
        if r.kld is not None:
            how = plan_score(r)
            points.append({"label": r.label + ("" if how == "–" else f" ({how})"), "series": series(r),
                           "bpw": r.bits_per_weight, "kld": r.kld.mean, "kld_se": r.kld.se or 0})
    for p in points:
        p["pareto"] = not any(q is not p and q["bpw"] <= p["bpw"] * (1 + SAME_SIZE) and q["kld"] < p["kld"]
                              for q in points)
    return points


# --- figures from the plan and the study -------------------------------------------------------

def entropy_figure(plans_dir: Path, model_hash: str, out_dir: Path) -> tuple[Path, str] | None:
    try:
        plan_file = find_plan(plans_dir, model_hash)
        plan = load_plan(plan_file)
    except UserError:
        return None
    per_block: dict[int, dict[str, float]] = {}
    for t in plan.tensors:
        if t.is_matrix and t.block is not None:
            per_block.setdefault(t.block, {})[tensor_kind(t)] = t.entropy_bits
    if not per_block:
        return None
    scores = {b.index: b.entropy_bits for b in plan.blocks}
    path = plots.entropy_heatmap(per_block, scores, f"Weight entropy per tensor ({plan.model_id})",
                                 out_dir / "entropy_heatmap.png")
    return path, str(plan_file)


def study_section(studies: list[StudyFile], model_hash: str, out_dir: Path) -> list[str]:
    mine = [s for s in studies if s.model_hash == model_hash]
    if not mine:
        return ["_No sensitivity study for this model in the results directory (run study_sensitivity.py)._"]
    study = max(mine, key=lambda s: s.created_utc)
    png = plots.sensitivity_scatter(study.units, study.correlations, PREDICTORS, out_dir / "sensitivity.png")
    lines = [f"KLD vs the original when only one unit is quantized to 4 bits ({study.four_bit_rule}; "
             f"imatrix: {study.imatrix or 'none'}), on {study.n_windows} windows x {study.stride} scored tokens. "
             "Spearman's rho against KLD, 95% bootstrap interval over units:", ""]
    header = ["level", "units"] + list(PREDICTORS)
    rows = []
    for level, stats in study.correlations.items():
        n = sum(1 for u in study.units if u.level == level)
        cells = []
        for key in PREDICTORS:
            s = stats[key]
            cells.append("n/a (constant)" if s.rho is None else
                         f"{s.rho:+.2f} [{s.ci[0]:+.2f}, {s.ci[1]:+.2f}]" if s.ci else f"{s.rho:+.2f}")
        rows.append([level, str(n)] + cells)
    lines += [markdown_table(header, rows), "", f"![sensitivity]({png.name})"]
    return lines


# --- the page --------------------------------------------------------------------------------

def build(results_dir: Path, plans_dir: Path, out_dir: Path, model_hash: str | None = None,
          settings_digest: str | None = None, baseline: str = Variant.GGUF_Q4_K_M.value) -> Path:
    _plan_params.cache_clear()  # plan files may have changed since an earlier report in this process
    found, studies = load_results(results_dir)
    reference = pick_reference(found, model_hash, settings_digest)
    rows, left_out = comparable(found, reference)
    out_dir = ensure_writable_dir(out_dir)
    s, env = reference.settings, reference.environment
    lines = [
        f"# EWQ comparison report: {reference.model}",
        "",
        f"Model hash `{reference.model_hash}`, settings `{s['digest']}` (the original on {s['device']}; each "
        f"variant's device in the last column, not part of what pairs): {s['ppl_windows']} perplexity "
        f"windows of {s['context']} tokens (stride {s['stride']}), KLD on the first {s['kld_windows']}; MMLU "
        f"{s['mmlu_per_subject']}/subject {s['mmlu_shots']}-shot; greedy generation, {s['max_new_tokens']} new tokens. "
        f"Environment of the original: {env.get('cpu')} x{env.get('cpu_count')}, "
        f"torch {env.get('torch')}, GPU: {env.get('gpu', 'none')}.",
        "",
        *answer_lines(rows, reference),
        "Deltas in parentheses are against the original: perplexity and MMLU paired on the same windows and "
        "questions; **(n.s.)** = within 2 standard errors of zero. Speed is per engine (torch vs llama.cpp): compare "
        "speeds within one engine. KLD = mean over tokens of KL(original || variant), SE across windows.",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(rows, reference)),
        "",
    ]
    base = next((r for r in rows if r.variant == baseline and not r.tag), None)
    if base is not None and base.kld is not None:
        lines += [f"## KLD at equal size: every variant against {base.label} (paired on the same windows)", "",
                  markdown_table(["variant", "weights MiB", "bpw", "plan", "KLD ± SE", f"Δ KLD vs {base.label}",
                                  "same top-1 %", "windows"], kld_vs_baseline_rows(rows, base)), ""]
    at_preset_sizes = preset_size_rows(rows)
    if at_preset_sizes:
        lines += ["## At each llama.cpp preset's size: its plans against it (paired on the same windows)", "",
                  markdown_table(["size of", "variant / plan", "tensor bytes", "KLD ± SE", "Δ KLD vs the preset",
                                  "same top-1 %", "ppl vs the preset"], at_preset_sizes), ""]
    points = pareto_points(rows)
    if points:
        plots.size_vs_kld(points, out_dir / "size_vs_kld.png")
        front = ", ".join(p["label"] for p in sorted(points, key=lambda p: p["bpw"]) if p["pareto"])
        lines += ["## Size vs KL divergence", "",
                  f"Pareto-optimal (no variant at most as large, within {100 * SAME_SIZE:g}%, and closer): {front}.", "",
                  "![size vs KLD](size_vs_kld.png)", ""]
    with_mmlu = {r.label: r.mmlu_per_subject for r in rows if r.mmlu_per_subject}
    if with_mmlu:
        plots.mmlu_by_subject(with_mmlu, out_dir / "mmlu_by_subject.png")
        lines += ["## MMLU per subject", "", "![MMLU per subject](mmlu_by_subject.png)", ""]
    heatmap = entropy_figure(plans_dir, reference.model_hash, out_dir)
    if heatmap:
        lines += ["## Weight entropy", "", f"From `{heatmap[1]}`.", "", "![entropy](entropy_heatmap.png)", ""]
    lines += ["## Does entropy predict sensitivity?", "", *study_section(studies, reference.model_hash, out_dir), ""]
    if left_out:
        lines += ["## Results not compared", ""] + [f"- `{r.path.name}`: {why}" for r, why in left_out] + [""]
    skipped = [f"- `{r.label}` skipped: {', '.join(r.skipped_stages)}" for r in rows if r.skipped_stages]
    if skipped:
        lines += ["## Stages left out", "", *skipped, ""]
    report = out_dir / "report.md"
    write_text_atomic(report, "\n".join(lines))
    return report
