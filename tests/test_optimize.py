"""The Lagrangian optimizer against brute force on small random instances."""
import itertools
import random

import pytest

from ewq.plan.optimize import Option, lower_hull, optimize


def random_items(rng, n_items, n_options):
    items = []
    for _ in range(n_items):
        costs = sorted(rng.sample(range(10, 200), n_options))
        distortion = sorted((rng.random() for _ in range(n_options)), reverse=True)
        if rng.random() < 0.3:  # an option off the hull, or dominated
            distortion[rng.randrange(n_options)] = rng.random()
        items.append([Option(c, d) for c, d in zip(costs, distortion)])
    return items


def brute_force(items, budget):
    best = None
    for picks in itertools.product(*(range(len(options)) for options in items)):
        cost = sum(options[k].cost for options, k in zip(items, picks))
        if cost <= budget:
            distortion = sum(options[k].distortion for options, k in zip(items, picks))
            best = distortion if best is None else min(best, distortion)
    return best


def test_hull_keeps_the_convex_lower_envelope():
    options = [Option(10, 1.0), Option(20, 0.8), Option(30, 0.2), Option(40, 0.15), Option(25, 0.9), Option(30, 0.5)]
    # (20, 0.8) lies above the segment (10, 1.0) -> (30, 0.2); (25, 0.9) and (30, 0.5) are dominated
    assert lower_hull(options) == [0, 2, 3]


optimal_runs = []


@pytest.mark.parametrize("seed", range(200))
def test_allocation_is_optimal_or_within_one_hull_step_and_never_over_budget(seed):
    rng = random.Random(seed)
    items = random_items(rng, rng.randint(1, 5), rng.randint(1, 4))
    floor = sum(min(o.cost for o in options) for options in items)
    top = sum(max(o.cost for o in options) for options in items)
    budget = rng.randint(floor, top + 10)
    picks = optimize(items, budget)
    cost = sum(options[k].cost for options, k in zip(items, picks))
    distortion = sum(options[k].distortion for options, k in zip(items, picks))
    assert cost <= budget
    hull_steps = [options[a].distortion - options[b].distortion for options in items
                  for a, b in zip(lower_hull(options), lower_hull(options)[1:])]
    optimum = brute_force(items, budget)
    assert distortion <= optimum + max(hull_steps, default=0.0) + 1e-12  # the greedy fill's bound
    optimal_runs.append(distortion <= optimum + 1e-12)
    if budget >= top:
        assert distortion == pytest.approx(sum(min(o.distortion for o in options) for options in items))


def test_allocation_is_mostly_exactly_optimal():
    """Over the 200 random instances above, the bound is rarely needed."""
    assert len(optimal_runs) == 200 and sum(optimal_runs) >= 190, sum(optimal_runs)


def test_allocation_is_exactly_optimal_when_the_budget_falls_on_a_hull_vertex():
    items = [[Option(10, 1.0), Option(20, 0.5), Option(40, 0.1)], [Option(10, 2.0), Option(15, 0.5), Option(30, 0.4)]]
    assert optimize(items, 35) == [1, 1]  # 20 + 15 bytes: both steeper first steps, nothing fits after


def test_a_budget_below_the_cheapest_options_is_refused():
    with pytest.raises(ValueError, match="over the budget"):
        optimize([[Option(10, 1.0)], [Option(20, 1.0)]], 29)
