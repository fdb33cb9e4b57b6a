"""The statistics behind every figure: means, proportions, paired differences and ratios with their standard
errors (as results.estimate.Estimate), percentiles, bootstrap errors, rank correlations."""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

from ..results.estimate import Estimate


def mean_se(values: Sequence[float]) -> Estimate:
    """Mean, standard error of the mean (sample std / sqrt(n)), and n."""
    n = len(values)
    if n == 0:
        return Estimate(None, None, 0)
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(mean, None, n)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def proportion_se(successes: int, n: int) -> Estimate:
    """A proportion with its binomial standard error sqrt(p(1-p)/n)."""
    if n == 0:
        return Estimate(None, None, 0)
    p = successes / n
    return Estimate(p, math.sqrt(p * (1 - p) / n), n)


def paired_difference(variant: Sequence[float], reference: Sequence[float]) -> Estimate:
    """Mean of variant[i] - reference[i] with its SE: the paired comparison on shared items."""
    if len(variant) != len(reference):
        raise ValueError(f"paired samples differ in length: {len(variant)} vs {len(reference)}")
    return mean_se([v - r for v, r in zip(variant, reference)])


def paired_ratio(variant: Sequence[float], reference: Sequence[float]) -> Estimate:
    """mean(variant) / mean(reference) over shared items, with its SE by the delta method: the SE of
    mean(variant − r·reference) over mean(reference), so that what the two share cancels as in a paired
    difference."""
    if len(variant) != len(reference):
        raise ValueError(f"paired samples differ in length: {len(variant)} vs {len(reference)}")
    base = mean_se(reference).mean
    if not base:
        return Estimate(None, None, len(variant))
    ratio = mean_se(variant).mean / base
    residual = mean_se([v - ratio * r for v, r in zip(variant, reference)])
    return Estimate(ratio, None if residual.se is None else residual.se / abs(base), len(variant))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bootstrap_se(items: Sequence, statistic: Callable[[Sequence], float], rounds: int = 200, seed: int = 0) -> float | None:
    """Standard error of `statistic` over items, by a seeded bootstrap."""
    if len(items) < 2:
        return None
    rng = random.Random(seed)
    samples = [statistic([items[rng.randrange(len(items))] for _ in items]) for _ in range(rounds)]
    center = math.fsum(samples) / rounds
    return math.sqrt(math.fsum((s - center) ** 2 for s in samples) / (rounds - 1))


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant."""
    n = len(x)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"samples differ in length: {len(x)} vs {len(y)}")
    if len(x) < 3:
        return None
    return pearson(ranks(x), ranks(y))


def spearman_bootstrap(x: Sequence[float], y: Sequence[float], rounds: int = 2000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """Spearman's rho with a percentile bootstrap interval over the (x, y) pairs."""
    rho = spearman(x, y)
    result = {"rho": rho, "n": len(x), "ci_level": level, "ci": None, "bootstrap_rounds": rounds}
    if rho is None:
        return result
    rng = random.Random(seed)
    samples = []
    for _ in range(rounds):
        picks = [rng.randrange(len(x)) for _ in x]
        value = spearman([x[i] for i in picks], [y[i] for i in picks])
        if value is not None:
            samples.append(value)
    tail = 100 * (1 - level) / 2
    result["ci"] = [percentile(samples, tail), percentile(samples, 100 - tail)]
    result["ci_excludes_zero"] = result["ci"][0] > 0 or result["ci"][1] < 0
    return result
