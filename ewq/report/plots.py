"""PNG figures for the report and the sensitivity study (matplotlib, Agg: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..fileio import atomic_path  # noqa: E402


def _save(fig, target: Path) -> Path:
    with atomic_path(target) as temp:
        fig.savefig(temp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return target


def entropy_heatmap(block_kind_entropy: dict[int, dict[str, float]], block_scores: dict[int, float],
                    title: str, target: Path) -> Path:
    """Rows: tensor kinds; columns: blocks; colour: entropy in bits. Block scores in a strip below."""
    blocks = sorted(block_kind_entropy)
    kinds = sorted({k for row in block_kind_entropy.values() for k in row})
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for j, block in enumerate(blocks):
        for i, kind in enumerate(kinds):
            grid[i, j] = block_kind_entropy[block].get(kind, np.nan)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.32 * len(blocks) + 2), 0.4 * len(kinds) + 2.4),
                                      gridspec_kw={"height_ratios": [len(kinds), 1.2]}, sharex=True)
    image = top.imshow(grid, aspect="auto", cmap="viridis")
    top.set_yticks(range(len(kinds)), kinds)
    top.set_title(title)
    fig.colorbar(image, ax=[top, bottom], label="entropy (bits, 256-bin histogram)")
    strip = np.array([[block_scores.get(b, np.nan) for b in blocks]])
    bottom.imshow(strip, aspect="auto", cmap="viridis")
    bottom.set_yticks([0], ["block"])
    bottom.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    bottom.set_xlabel("transformer block")
    return _save(fig, target)


def size_vs_kld(points: list[dict], target: Path) -> Path:
    """points: {label, series, bpw, kld, kld_se, pareto}; one line per series (llama.cpp's presets, each
    plan score), KLD on a log axis; Pareto-optimal points filled, the others hollow."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.get_cmap("tab10").colors
    names = sorted({p["series"] for p in points}, key=lambda s: (s != "llama.cpp presets", s))
    for colour, name in zip(colours * (len(names) // len(colours) + 1), names):
        line = sorted((p for p in points if p["series"] == name), key=lambda p: p["bpw"])
        ax.plot([p["bpw"] for p in line], [p["kld"] for p in line], color=colour, lw=1.0, alpha=0.7,
                marker=None, label=f"{name} ({len(line)})")
        for p in line:
            ax.errorbar(p["bpw"], p["kld"], yerr=p["kld_se"], fmt="o", ms=5, capsize=3, color=colour,
                        markerfacecolor=colour if p["pareto"] else "white")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="filled: Pareto-optimal",
              title_fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (read back from the weights)")
    ax.set_ylabel("KLD vs original (nats/token, ± SE)")
    ax.set_title("Size vs KL divergence")
    ax.grid(alpha=0.3)
    return _save(fig, target)


def mmlu_by_subject(per_variant: dict[str, dict[str, dict]], target: Path) -> Path:
    """Accuracy per subject (± SE) for every variant, subjects sorted by the first variant."""
    variants = list(per_variant)
    subjects = sorted(per_variant[variants[0]], key=lambda s: per_variant[variants[0]][s]["mean"])
    fig, ax = plt.subplots(figsize=(8, max(4, 0.16 * len(subjects) * max(1, len(variants) / 3) + 1)))
    height = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        ys = np.arange(len(subjects)) + k * height
        means = [100 * per_variant[variant].get(s, {}).get("mean", np.nan) for s in subjects]
        errs = [100 * (per_variant[variant].get(s, {}).get("se") or 0) for s in subjects]
        ax.barh(ys, means, height=height, xerr=errs, label=variant, error_kw={"lw": 0.4, "alpha": 0.35})
    ax.axvline(25, color="k", lw=0.8, ls="--", label="chance (25%)")
    ax.set_yticks(np.arange(len(subjects)) + 0.4 - height / 2, subjects, fontsize=6)
    ax.set_xlabel("MMLU accuracy % (± binomial SE)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, target)


def sensitivity_scatter(rows: list, correlations: dict, predictors: tuple[str, ...], target: Path) -> Path:
    """One panel per (level, predictor): KLD when only that unit is 4-bit vs the predictor (rows:
    study.UnitRow, correlations: level -> predictor -> study.Correlation)."""
    levels = sorted({r.level for r in rows})
    fig, axes = plt.subplots(len(levels), len(predictors), figsize=(3.1 * len(predictors), 3 * len(levels)),
                             squeeze=False)
    for i, level in enumerate(levels):
        subset = [r for r in rows if r.level == level]
        for j, key in enumerate(predictors):
            ax = axes[i][j]
            ax.errorbar([r.predictors[key] for r in subset], [r.kld for r in subset],
                        yerr=[r.kld_se or 0 for r in subset], fmt="o", ms=3, capsize=2)
            if level == "kind":
                for r in subset:
                    ax.annotate(r.unit, (r.predictors[key], r.kld), fontsize=6)
            stat = correlations[level][key]
            rho = "n/a (constant)" if stat.rho is None else f"{stat.rho:+.2f}"
            ci = "" if not stat.ci else f" [{stat.ci[0]:+.2f}, {stat.ci[1]:+.2f}]"
            ax.set_title(f"{level}: rho {rho}{ci}", fontsize=8)
            ax.set_xlabel(key, fontsize=8)
            if j == 0:
                ax.set_ylabel("KLD, only this unit 4-bit", fontsize=8)
            ax.tick_params(labelsize=7)
            if all(r.kld > 0 for r in subset):
                ax.set_yscale("log")
            values = [r.predictors[key] for r in subset]
            if key == "numel" and max(values) > 10 * max(1, min(values)):
                ax.set_xscale("log")
    fig.tight_layout()
    return _save(fig, target)
