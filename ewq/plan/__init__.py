"""The quantization plan: read the weights, score them, decide, write the plan files.

    model.py      the vocabulary (Precision, Granularity, Score, Rule, Reason), entries, params, hash,
                  keep-rules and parameter-weighted aggregation
    entropy.py    histogram entropy and the statistics recorded beside it
    scores.py     entropy / error / random behind one Scorer interface
    threshold.py  the threshold rule (EWQ's original decision)
    budget.py     the size-budget allocation over type ladders
    build.py      model directory -> Plan (read, score, decide)
    files.py      plan JSON and quantize script: write, read and validate, find
"""
from .files import find_plan, load_plan, plan_for_model, plan_path, script_path, write_plan
from .model import (BlockEntry, Granularity, Plan, PlanParams, Precision, Reason, Rule, Score, TensorEntry, Thresholds,
                    keep_reason, llama_type_for, plan_hash)

__all__ = ["BlockEntry", "Granularity", "Plan", "PlanParams", "Precision", "Reason", "Rule", "Score", "TensorEntry",
           "Thresholds", "find_plan", "keep_reason", "llama_type_for", "load_plan", "plan_for_model", "plan_hash",
           "plan_path", "script_path", "write_plan"]
