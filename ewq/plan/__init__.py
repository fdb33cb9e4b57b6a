"""The quantization plan: read the weights, score them, decide, write the plan files.

    entries.py     the plan's vocabulary (Granularity, Score, Rule, Reason), TensorEntry, BlockEntry, Plan,
                   PlanParams, the hash; keep-rules and parameter-weighted aggregation
    reports.py     what a plan reports of itself, typed: BudgetReport, PlanSummary
    entropy.py     histogram entropy and the statistics recorded beside it
    distortion.py  per tensor and type: exact bytes and the measured relative error
    scores.py      entropy / error / random / kld behind one Scorer interface
    threshold.py   decision 1: the threshold rule (EWQ's original)
    allocate.py    one allocator over a menu (rank-ordered rounds, or the Lagrangian optimize.py)
    budget.py      decision 2: the size-budget allocation, GGUF and bitsandbytes by the same code
    create.py      model directory -> Plan (name, read, score, decide)
    files.py       plan JSON and quantize script: write, read and validate, find
The types a plan chooses from are ewq.quant_types; measured sensitivity is ewq.sensitivity.
"""
from .entries import (BlockEntry, Granularity, Plan, PlanParams, Reason, Rule, Score, TensorEntry, Thresholds,
                      keep_reason, plan_hash)
from .files import find_plan, load_plan, plan_for_model, plan_path, script_path, write_plan

__all__ = ["BlockEntry", "Granularity", "Plan", "PlanParams", "Reason", "Rule", "Score", "TensorEntry",
           "Thresholds", "find_plan", "keep_reason", "load_plan", "plan_for_model", "plan_hash",
           "plan_path", "script_path", "write_plan"]
