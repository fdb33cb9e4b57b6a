import json
import re
import subprocess

import pytest

from ewq import plan as plan_mod
from ewq.llamacpp.script import tensor_types
from ewq.errors import UserError
from ewq.plan import Granularity, PlanParams, Thresholds
from ewq.quant_types import Precision, threshold_type
from ewq.plan import threshold
from ewq.plan.entries import apply_keep_rule
from ewq.plan.create import create_plan
from ewq.plan import files as plan_files
from ewq.plan.files import write_plan


def entry(name, entropy, shape=(256, 256), block=None):
    numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
    return plan_mod.TensorEntry(hf_name=name, gguf_name=None, block=block, shape=list(shape), dtype="F16",
                                numel=numel, entropy_bits=entropy, std=1.0, max_abs_over_std=4.0, excess_kurtosis=0.0)


def test_tiers_follow_mean_and_std():
    params = PlanParams(entropy_factor=1.0, fp16_factor=1.0)
    th = Thresholds.from_scores([1.0, 2.0, 3.0, 4.0, 5.0], params)  # mean 3, pstdev sqrt(2)
    assert th.mean == 3.0 and th.std == pytest.approx(2**0.5)
    assert th.tier(5.0) is Precision.FP16
    assert th.tier(3.0) is Precision.INT8
    assert th.tier(1.0) is Precision.INT4
    assert th.tier(3.0 - 2**0.5) is Precision.INT8  # the boundary belongs to 8-bit


def test_keep_rules_and_tensor_granularity():
    tensors = [
        entry("model.embed_tokens.weight", 1.0, (1000, 256)),
        entry("model.layers.0.input_layernorm.weight", 1.0, (256,), block=0),
        entry("model.layers.0.mlp.down_proj.weight", 1.0, block=0),
        entry("model.layers.0.mlp.up_proj.weight", 5.0, block=0),
        entry("model.layers.1.mlp.down_proj.weight", 3.0, block=1),
        entry("model.layers.1.self_attn.k_proj.weight", 3.0, (64, 256), block=1),
        entry("lm_head.weight", 1.0, (1000, 256)),
    ]
    params = PlanParams(entropy_factor=0.5, fp16_factor=0.5, min_params=20_000)
    for t in tensors:  # as create.read_entries does, when each entry is read
        apply_keep_rule(t, params)
    threshold.decide(tensors, params)
    by_name = {t.hf_name: t for t in tensors}
    assert by_name["model.embed_tokens.weight"].reason == "keep:embedding"
    assert by_name["lm_head.weight"].reason == "keep:lm_head"
    assert by_name["model.layers.0.input_layernorm.weight"].llama_type == "F32"
    assert by_name["model.layers.1.self_attn.k_proj.weight"].reason == "keep:small"
    assert by_name["model.layers.0.mlp.down_proj.weight"].precision is Precision.INT4
    assert by_name["model.layers.0.mlp.up_proj.weight"].precision is Precision.FP16
    assert by_name["model.layers.1.mlp.down_proj.weight"].precision is Precision.INT8


def test_block_granularity_gives_every_matrix_its_block_decision():
    tensors = [entry(f"model.layers.{b}.mlp.{k}.weight", e, block=b)
               for b, pair in enumerate([(1.0, 1.2), (3.0, 3.1), (5.0, 5.5)]) for k, e in zip(("up_proj", "down_proj"), pair)]
    blocks = threshold.decide(tensors, PlanParams(granularity=Granularity.BLOCK, entropy_factor=0.5,
                                                   fp16_factor=0.5)).blocks
    assert [b.precision for b in blocks] == [Precision.INT4, Precision.INT8, Precision.FP16]
    assert blocks[0].entropy_bits == pytest.approx(1.1)  # parameter-weighted mean of equal-size matrices
    for t in tensors:
        assert t.precision is blocks[t.block].precision and t.reason == "block-entropy"


def test_llama_type_respects_row_block_size():
    assert threshold_type(Precision.INT4, 1536) == "Q4_K"
    assert threshold_type(Precision.INT4, 576) == "Q4_0"
    assert threshold_type(Precision.INT8, 576) == "Q8_0"
    assert threshold_type(Precision.INT8, 100) == "F16"


@pytest.fixture
def tiny_plan(tiny_model_dir):
    return create_plan(str(tiny_model_dir), PlanParams())


def test_plan_of_a_model_covers_every_tensor_and_is_deterministic(tiny_model_dir, tiny_plan):
    again = create_plan(str(tiny_model_dir), PlanParams())
    assert tiny_plan.plan_hash == again.plan_hash and tiny_plan.model_hash == again.model_hash
    assert [t.entropy_bits for t in tiny_plan.tensors] == [t.entropy_bits for t in again.tensors]
    assert len(tiny_plan.blocks) == 12
    matrices = [t for t in tiny_plan.tensors if t.is_matrix]
    assert all(t.gguf_name for t in matrices)
    counts = tiny_plan.summary().matrices_by_precision
    assert sum(c.tensors for c in counts.values()) == len(matrices)
    assert counts["4bit"].tensors > 0 and counts["8bit"].tensors > 0


def test_plan_json_round_trip(tmp_path, tiny_plan):
    json_path, script = write_plan(tiny_plan, tmp_path)
    loaded = plan_mod.load_plan(json_path)
    assert plan_files.to_json(loaded) == json.loads(json_path.read_text())
    assert plan_mod.find_plan(tmp_path, tiny_plan.model_hash) == json_path


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d["tensors"][3].update(precision="3bit"), "3bit"),
    (lambda d: d["tensors"][3].update(llama_type="Q9_9"), "Q9_9"),
    (lambda d: d["tensors"][3].pop("entropy_bits"), "misses"),
    (lambda d: d.pop("params"), "params"),
    (lambda d: d["params"].update(entropy_factor=0.1), "plan_hash"),
])
def test_corrupt_plans_are_refused(tmp_path, tiny_plan, corrupt, message):
    data = plan_files.to_json(tiny_plan)
    corrupt(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=re.escape(message)):
        plan_mod.load_plan(path)


def test_not_json_plan_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        plan_mod.load_plan(path)


def test_every_pattern_matches_exactly_one_gguf_tensor(tiny_plan):
    """tensor_types_<hash>.txt, llama-quantize's --tensor-type-file: a `pattern=type` line per planned matrix."""
    names = [t.gguf_name for t in tiny_plan.tensors if t.gguf_name]
    assert "blk.1.attn_q.weight" in names and "blk.10.attn_q.weight" in names
    # the trap anchoring avoids: an unanchored `blk.1.` also hits blk.10. and blk.11.
    assert len([n for n in names if re.search("blk.1.", n)]) > len([n for n in names if n.startswith("blk.1.")])
    lines = tensor_types(tiny_plan).splitlines()
    patterns = [tuple(line.rsplit("=", 1)) for line in lines]
    assert len(patterns) == sum(t.is_matrix for t in tiny_plan.tensors)
    assert all(len(line.split()) == 1 for line in lines)  # llama-quantize splits the file at whitespace
    for pattern, type_name in patterns:
        hits = [n for n in names if re.search(pattern, n)]
        assert len(hits) == 1, (pattern, hits)
        planned = next(t for t in tiny_plan.tensors if t.gguf_name == hits[0])
        assert planned.llama_type.lower() == type_name


def test_quantize_script_is_valid_bash_with_pure_and_quantized_base(tmp_path, tiny_plan):
    _, script = write_plan(tiny_plan, tmp_path)
    text = script.read_text()
    assert "--pure" in text and text.rstrip().endswith('"$input" "$output" Q8_0')
    subprocess.run(["bash", "-n", str(script)], check=True)
    fake = tmp_path / "fake-quantize"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/args.txt"\n')
    fake.chmod(0o755)
    subprocess.run([str(script), "in.gguf", "out.gguf", "--imatrix", "m.dat"], check=True,
                   env={"LLAMA_QUANTIZE": str(fake), "PATH": "/usr/bin:/bin"})
    args = (tmp_path / "args.txt").read_text().splitlines()
    types = tmp_path / f"tensor_types_{tiny_plan.plan_hash}.txt"
    assert args == ["--pure", "--imatrix", "m.dat", "--tensor-type-file", str(types), "in.gguf", "out.gguf", "Q8_0"]
    assert r"^blk\.10\.attn_q\.weight$=" + next(
        t.llama_type.lower() for t in tiny_plan.tensors if t.gguf_name == "blk.10.attn_q.weight") in types.read_text()
    types.unlink()  # a script copied without its types file says so in one line, exit code 2
    missing = subprocess.run([str(script), "in.gguf", "out.gguf"], capture_output=True, text=True,
                             env={"LLAMA_QUANTIZE": str(fake), "PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2 and "is missing" in missing.stderr and len(missing.stderr.splitlines()) == 1
