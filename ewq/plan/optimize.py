"""Choosing one option per item under a byte budget, minimising the summed distortion.

Each item (a tensor) has options (llama.cpp or bitsandbytes types), each with a cost in bytes and a
predicted distortion (ΔKLD). The problem, min Σ D subject to Σ B ≤ budget, is a multiple-choice
knapsack; the allocation here is the classic Lagrangian one (as in llama.cpp PR #15550 and
exllamav3's optimizer):
  1. per item, keep only the options on the lower convex hull of (bytes, distortion): an option
     above the segment joining two others is never the best for any price of a byte;
  2. for a price λ ≥ 0, each item independently takes the hull option minimising D + λ·B; the bytes
     this spends fall as λ rises, so bisection on λ finds the cheapest price whose choice fits;
  3. greedy fill: the budget left over goes to the single hull steps with the best ΔD/ΔB that still
     fit, one at a time;
  4. polish: while some change of one item's option, or of two items' options together (one
     cheaper, one dearer), lowers the distortion and fits, take the best such change.
The Lagrangian choice is optimal for the bytes it spends; after the greedy fill the result is
within one hull step's distortion of the true optimum, and the polish only lowers it. The result
never exceeds the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    cost: int  # bytes
    distortion: float  # predicted ΔKLD (any additive loss)


def lower_hull(options: list[Option]) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, distortion), by increasing cost
    and strictly decreasing distortion. Among options of equal cost the lowest distortion is kept."""
    order = sorted(range(len(options)), key=lambda i: (options[i].cost, options[i].distortion))
    hull: list[int] = []
    for i in order:
        o = options[i]
        if hull and options[hull[-1]].cost == o.cost:
            continue  # same cost, higher (or equal) distortion
        if hull and o.distortion >= options[hull[-1]].distortion:
            continue  # costs more, no better
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            # b lies on or above the segment a -> o: drop it
            if (b.distortion - a.distortion) * (o.cost - a.cost) >= (o.distortion - a.distortion) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _choose(hulls: list[list[Option]], price: float) -> list[int]:
    """Per item, the hull position minimising D + price·B (ties: the cheaper)."""
    return [min(range(len(h)), key=lambda k: (h[k].distortion + price * h[k].cost, h[k].cost)) for h in hulls]


def _spent(hulls: list[list[Option]], picks: list[int]) -> int:
    return sum(h[k].cost for h, k in zip(hulls, picks))


def optimize(items: list[list[Option]], budget: int, iterations: int = 100) -> list[int]:
    """The chosen option index per item (indices into each item's own list). Raises ValueError if
    even the cheapest options exceed the budget."""
    hull_index = [lower_hull(options) for options in items]
    hulls = [[options[i] for i in idx] for options, idx in zip(items, hull_index)]
    floor = sum(h[0].cost for h in hulls)
    if floor > budget:
        raise ValueError(f"the cheapest options take {floor} bytes, over the budget of {budget}")

    picks = _choose(hulls, 0.0)  # free bytes: every item takes its least distortion
    if _spent(hulls, picks) > budget:
        # the steepest hull step bounds the price at which every item takes its cheapest option
        high = max(((h[k].distortion - h[k + 1].distortion) / (h[k + 1].cost - h[k].cost)
                    for h in hulls for k in range(len(h) - 1)), default=0.0) * 2 + 1.0
        low = 0.0
        picks = _choose(hulls, high)
        for _ in range(iterations):
            middle = (low + high) / 2
            trial = _choose(hulls, middle)
            if _spent(hulls, trial) <= budget:
                high, picks = middle, trial
            else:
                low = middle
    picks = _greedy_fill(hulls, picks, budget - _spent(hulls, picks))
    return _polish(items, [hull_index[item][k] for item, k in enumerate(picks)], budget)


def _greedy_fill(hulls: list[list[Option]], picks: list[int], left: int) -> list[int]:
    """Take single hull steps, best distortion saved per byte first, while they fit."""
    picks = list(picks)
    while True:
        best, best_rate = None, 0.0
        for item, (h, k) in enumerate(zip(hulls, picks)):
            if k + 1 < len(h):
                extra = h[k + 1].cost - h[k].cost
                saved = h[k].distortion - h[k + 1].distortion
                if extra <= left and saved > 0 and saved / extra > best_rate:
                    best, best_rate = item, saved / extra
        if best is None:
            return picks
        left -= hulls[best][picks[best] + 1].cost - hulls[best][picks[best]].cost
        picks[best] += 1


def _polish(items: list[list[Option]], picks: list[int], budget: int, max_rounds: int = 1000) -> list[int]:
    """Best improving change of one option, or of two items' options at once, while one fits."""
    picks = list(picks)
    owner = np.array([i for i, options in enumerate(items) for _ in options])
    choice = np.array([k for options in items for k in range(len(options))])
    cost = np.array([o.cost for options in items for o in options], dtype=np.int64)
    distortion = np.array([o.distortion for options in items for o in options])
    first = np.cumsum([0] + [len(options) for options in items])[:-1]  # flat index of each item's option 0
    for _ in range(max_rounds):
        current = first[owner] + np.array(picks)[owner]  # per move: the flat index of its item's pick
        extra, gain = cost - cost[current], distortion - distortion[current]  # per move: bytes, distortion
        left = budget - int(cost[first + np.array(picks)].sum())
        single = np.where(extra <= left, gain, np.inf)
        pair = gain[:, None] + gain[None, :]
        pair[(extra[:, None] + extra[None, :] > left) | (owner[:, None] == owner[None, :])] = np.inf
        best_single, best_pair = int(single.argmin()), int(pair.argmin())
        if min(single[best_single], pair.flat[best_pair]) >= -1e-15:
            return picks
        moves = [best_single] if single[best_single] <= pair.flat[best_pair] else list(divmod(best_pair, len(owner)))
        for move in moves:
            picks[owner[move]] = int(choice[move])
    return picks
