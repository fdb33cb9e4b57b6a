"""One allocator over a menu: each ranked matrix takes one option of its target's menu, the whole fits a budget.

A Menu says what one target (GGUF or bitsandbytes) offers a matrix: its options, cheapest first,
and what each costs. allocate() chooses, by one of two rules:
  predicted  given a predicted distortion per option (the kld score): minimise its sum over exact
             bytes with the Lagrangian allocation (optimize.py);
  ranked     given only a rank score per matrix (entropy, error, random): every matrix starts on its
             cheapest option; in rounds, walk the rank order (highest first) and lift each matrix one
             option if the extra bits still fit; stop after a round that lifted nothing. The result
             never exceeds the budget and misses it by less than the cheapest remaining lift.
The GGUF and bitsandbytes targets of a plan are two calls of the same code (budget.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

from ..quant_types import BNB_MENU, bnb_bits, gguf_menu, rank_ladder
from .distortion import bnb_bytes, gguf_bytes
from .entries import TensorEntry
from .optimize import Option, optimize


@dataclass(frozen=True)
class Menu:
    """What one target offers each matrix: options (llama.cpp types or bitsandbytes precisions),
    cheapest first, with their cost in bits (numel × bits per weight) and in exact bytes."""
    target: str
    options: Callable[[TensorEntry], list]
    bits: Callable[[TensorEntry, Any], float]
    nbytes: Callable[[TensorEntry, Any], int]


GGUF_RANKED = Menu("gguf", lambda t: rank_ladder(t.ncols), lambda t, o: t.numel * o.bits_per_weight, gguf_bytes)
GGUF_PREDICTED = Menu("gguf", lambda t: gguf_menu(t.ncols), lambda t, o: t.numel * o.bits_per_weight, gguf_bytes)
BITSANDBYTES = Menu("bitsandbytes", lambda t: list(BNB_MENU), lambda t, p: t.numel * bnb_bits(p, t.ncols), bnb_bytes)


@dataclass(frozen=True)
class Allocation:
    """The option chosen for every matrix (hf_name -> option), or None where even the cheapest
    options exceed the budget; their bits at the cheapest options; Σ predicted distortion."""
    choice: dict[str, Hashable] | None
    floor_bits: float
    predicted: float | None = None


def allocate(entries: list[TensorEntry], menu: Menu, budget_bits: float, rank: dict[str, float],
             predicted: dict[str, dict] | None = None) -> Allocation:
    """Each entry's option of `menu` within `budget_bits` (module doc: by `predicted` where given,
    else by `rank`)."""
    options = [menu.options(t) for t in entries]
    floor = sum(menu.bits(t, min(opts, key=lambda o: menu.bits(t, o))) for t, opts in zip(entries, options))
    if predicted is None:
        costs = [[menu.bits(t, o) for o in opts] for t, opts in zip(entries, options)]
        order = sorted(range(len(entries)), key=lambda i: (-rank[entries[i].hf_name], entries[i].hf_name))
        try:
            levels = rank_rounds(costs, order, budget_bits)
        except ValueError:
            return Allocation(None, floor)
    else:
        items = [[Option(menu.nbytes(t, o), predicted[t.hf_name][o]) for o in opts] for t, opts in zip(entries, options)]
        try:
            levels = optimize(items, int(budget_bits // 8))
        except ValueError:
            return Allocation(None, floor)
    choice = {t.hf_name: opts[level] for t, opts, level in zip(entries, options, levels)}
    total = None if predicted is None else sum(predicted[name][o] for name, o in choice.items())
    return Allocation(choice, floor, total)


def rank_rounds(costs: list[list[float]], order: list[int], budget: float) -> list[int]:
    """Option index per item: rank-ordered rounds of one-option lifts while they fit (module doc).
    costs[i][r] is the cost of item i's option r (increasing in r); a floor over the budget is a ValueError."""
    levels = [0] * len(costs)
    spent = sum(c[0] for c in costs)
    if spent > budget:
        raise ValueError(f"floor {spent:.0f} exceeds budget {budget:.0f}")
    lifted = True
    while lifted:
        lifted = False
        for i in order:
            if levels[i] + 1 < len(costs[i]):
                extra = costs[i][levels[i] + 1] - costs[i][levels[i]]
                if spent + extra <= budget:
                    levels[i] += 1
                    spent += extra
                    lifted = True
    return levels
