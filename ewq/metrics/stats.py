"""Means with standard errors, percentiles, and paired differences."""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence


def mean_se(values: Sequence[float]) -> dict:
    """Mean, standard error of the mean (sample std / sqrt(n)), and n."""
    n = len(values)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "se": None, "n": n}
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "se": math.sqrt(variance / n), "n": n}


def proportion_se(successes: int, n: int) -> dict:
    """A proportion with its binomial standard error sqrt(p(1-p)/n)."""
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    p = successes / n
    return {"mean": p, "se": math.sqrt(p * (1 - p) / n), "n": n}


def paired_difference(variant: Sequence[float], reference: Sequence[float]) -> dict:
    """Mean of variant[i] - reference[i] with its SE: the paired comparison on shared items."""
    if len(variant) != len(reference):
        raise ValueError(f"paired samples differ in length: {len(variant)} vs {len(reference)}")
    result = mean_se([v - r for v, r in zip(variant, reference)])
    if result["se"]:
        result["z"] = result["mean"] / result["se"]
        result["significant_2se"] = abs(result["z"]) > 2
    return result


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
