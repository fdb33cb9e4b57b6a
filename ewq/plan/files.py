"""Plan files: quant_plan_<hash>.json, quantize_command_<hash>.sh and the tensor_types_<hash>.txt it passes
to llama-quantize; writing, reading, finding.

Reading validates everything and rebuilds the typed plan: any problem is a UserError naming the
file (not JSON, a missing field, another schema, an unknown precision or type, a hash that does
not match the parameters: edited by hand).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import UserError
from ..llamacpp.script import quantize_script, tensor_types
from ..fileio import ensure_writable_dir, read_json, write_json_atomic, write_text_atomic
from . import budget, threshold
from .entropy import ENTROPY_FORMULA
from .entries import SCHEMA_VERSION, BlockEntry, Plan, PlanParams, TensorEntry, Thresholds
from .reports import BudgetReport

PLAN_PREFIX, SCRIPT_PREFIX, TYPES_PREFIX = "quant_plan_", "quantize_command_", "tensor_types_"
_TENSOR_FIELDS = {f.name for f in dataclasses.fields(TensorEntry)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def plan_path(out_dir: Path, plan_hash: str) -> Path:
    return Path(out_dir) / f"{PLAN_PREFIX}{plan_hash}.json"


def script_path(out_dir: Path, plan_hash: str) -> Path:
    return Path(out_dir) / f"{SCRIPT_PREFIX}{plan_hash}.sh"


def types_path(out_dir: Path, plan_hash: str) -> Path:
    return Path(out_dir) / f"{TYPES_PREFIX}{plan_hash}.txt"


def to_json(plan: Plan) -> dict:
    return {
        "schema_version": plan.schema_version,
        "plan_hash": plan.plan_hash,
        "created_unix": plan.created_unix,
        "model": {"id": plan.model_id, "hash": plan.model_hash, "model_type": plan.model_type},
        "entropy": {"formula": ENTROPY_FORMULA, "bins": plan.params.bins, "unit": "bits",
                    "block_score": "parameter-weighted mean of the block's matrix entropies"},
        "params": plan.params.to_json(),
        "decision_rule": {
            "rule": plan.params.rule.value,
            "budget": budget.rule_text(plan.params) if plan.params.is_budget else None,
            **threshold.RULE_TEXT,
            "thresholds": {level: dataclasses.asdict(th) for level, th in plan.thresholds.items()},
        },
        "summary": plan.summary().to_json(),
        "budget": plan.budget.to_json() if plan.budget else None,
        "blocks": [b.to_json() for b in plan.blocks],
        "tensors": [t.to_json() for t in plan.tensors],
    }


def write_plan(plan: Plan, out_dir: Path) -> tuple[Path, Path]:
    out_dir = ensure_writable_dir(out_dir)
    json_path, script = plan_path(out_dir, plan.plan_hash), script_path(out_dir, plan.plan_hash)
    types = types_path(out_dir, plan.plan_hash)
    types_text = tensor_types(plan)  # refused before anything is written
    write_text_atomic(types, types_text)  # first: the script never names a file that is not there
    write_text_atomic(script, quantize_script(plan, types.name), mode=0o755)
    write_json_atomic(json_path, to_json(plan))
    return json_path, script


def from_json(data: dict, source: str) -> Plan:
    """Validate and rebuild a plan; any problem is a UserError naming the file."""
    def bad(why: str) -> UserError:
        return UserError(f"plan {source} is invalid: {why}")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise bad(f"schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}")
    try:
        model, raw_params = data["model"], data["params"]
        tensors = []
        for raw in data["tensors"]:
            missing = _TENSOR_FIELDS - raw.keys()
            if missing:
                raise bad(f"tensor entry {raw.get('hf_name', '?')} misses {sorted(missing)}")
            tensors.append(TensorEntry(**raw))  # parses precision, llama_type and reason
        plan = Plan(model_id=model["id"], model_hash=model["hash"], model_type=model["model_type"],
                    params=PlanParams(**raw_params), tensors=tensors,
                    blocks=[BlockEntry(**b) for b in data["blocks"]],
                    thresholds={k: Thresholds(**v) for k, v in data["decision_rule"]["thresholds"].items()},
                    budget=BudgetReport.from_json(data.get("budget")), created_unix=data["created_unix"])
    except UserError as error:
        raise bad(str(error).removeprefix(f"plan {source} is invalid: ")) from None
    except (KeyError, TypeError, ValueError) as error:
        raise bad(f"{type(error).__name__}: {error}") from None
    if data.get("plan_hash") != plan.plan_hash:
        raise bad("plan_hash does not match its model hash and parameters (edited by hand?)")
    return plan


def load_plan(path: Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan not found: {path}")
    return from_json(read_json(path, "plan "), str(path))


def find_plan(plans_dir: Path, model_hash: str) -> Path:
    """The newest plan in plans_dir made for this model hash."""
    candidates = []
    for path in Path(plans_dir).glob(f"{PLAN_PREFIX}*.json"):
        try:
            data = json.loads(path.read_text())
            if data.get("model", {}).get("hash") == model_hash:
                candidates.append((data.get("created_unix", 0), path))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
    if not candidates:
        raise UserError(f"no plan for model hash {model_hash} in {plans_dir}; run create_quantization_plan.py first")
    return max(candidates)[1]


def plan_for_model(model_hash: str, plan_file: Path | None, plans_dir: Path) -> tuple[Path, Plan]:
    """The given plan, or the newest one in plans_dir for this model; refused if made for another model."""
    path = Path(plan_file) if plan_file else find_plan(plans_dir, model_hash)
    plan = load_plan(path)
    if plan.model_hash != model_hash:
        raise UserError(f"plan {path} was made for model hash {plan.model_hash}, not this model ({model_hash})")
    return path, plan
