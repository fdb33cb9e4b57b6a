"""Issue 5: the bad-input and fault matrix. Every row: exit code 2, one `error:` line, no traceback,
and not one file written or changed in any directory the scripts were pointed at."""
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import ENV, ROOT, assert_usage_error, run, tiny_llama
from ewq.results import checkpoint
from ewq import fileio as results
from ewq.errors import UserError


def snapshot(*dirs):
    """Every file (hidden ones too) under dirs, with size and modification time."""
    files = {}
    for directory in dirs:
        for path in Path(directory).rglob("*"):
            if path.is_file():
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def world(pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    results_dir = root / "results"
    shutil.copytree(pipeline["results"], results_dir)  # "previous results" that must survive every row
    plan = json.loads(pipeline["plan"].read_text())

    def plan_variant(name, change):
        data = json.loads(json.dumps(plan))
        change(data)
        path = root / f"{name}.json"
        path.write_text(json.dumps(data))
        return path

    (root / "not-json.json").write_text("{ this is not json")
    bad_plans = {
        "not_json": (root / "not-json.json", "not valid JSON"),
        "misses_fields": (plan_variant("misses", lambda d: d["tensors"][5].pop("entropy_bits")), "misses"),
        "schema_version": (plan_variant("schema", lambda d: d.update(schema_version=99)), "schema_version 99"),
        "unknown_precision": (plan_variant("precision", lambda d: d["tensors"][5].update(precision="3bit")),
                              "'3bit' is not a valid Precision"),
        "unknown_type": (plan_variant("type", lambda d: d["tensors"][5].update(llama_type="Q3_XX")),
                         "unknown llama.cpp tensor type 'Q3_XX'"),
        "edited": (plan_variant("edited", lambda d: d["params"].update(entropy_factor=0.1)), "plan_hash"),
    }
    tiny = root / "tiny"
    tiny_llama(num_layers=2).save_pretrained(tiny, safe_serialization=True)
    foreign = run("create_quantization_plan.py", "--model", tiny, "--out-dir", root / "foreign").stdout.split()[0]
    bad_plans["other_model"] = (Path(foreign), "was made for model hash")
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    save_file({"embeddings.weight": torch.zeros(4, 4)}, str(bert / "model.safetensors"))
    (root / "empty.txt").write_text("  \n")
    (root / "notes.txt").write_text("not a model file\n")
    f16 = next(pipeline["plan"].parent.glob("*-F16.gguf"))
    (root / "truncated.gguf").write_bytes(f16.read_bytes()[:4096])
    (root / "no-tools").mkdir()
    failing = root / "failing-tools"  # llama.cpp tools that exist but fail, as a tool meeting a full disk would
    failing.mkdir()
    for name in ("llama-bench", "llama-quantize", "llama-imatrix"):
        (failing / name).write_text("#!/bin/sh\necho 'first line' >&2\necho 'fake failure: no space left' >&2\nexit 3\n")
        (failing / name).chmod(0o755)
    (root / "a-file").write_text("x")
    return {"root": root, "results": results_dir, "plans": pipeline["plan"].parent, "bad_plans": bad_plans,
            "tiny": tiny, "bert": bert, "f16": f16}


def assert_row(world, result, fragment):
    assert_usage_error(result, fragment)
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def rows():
    """(id, script, args, env changes, expected fragment); {root}, {results}, {plans}, {tiny}... are filled in."""
    q = ["--quick", "--out-dir", "{results}"]
    table = [
        ("model_missing_plan", "create_quantization_plan.py", ["--model", "/no/such/model", "--out-dir", "{root}/p"], {},
         "model not found"),
        ("model_missing_original", "benchmark_original.py", ["--model", "/no/such/model", *q], {}, "model not found"),
        ("model_missing_gguf", "benchmark_gguf_q4.py", ["--model", "/no/such/model", "--gguf-dir", "{plans}", *q], {},
         "model not found"),
        ("model_missing_study", "study_sensitivity.py", ["--model", "/no/such/model", "--out-dir", "{results}"], {},
         "model not found"),
        ("not_a_causal_lm_plan", "create_quantization_plan.py", ["--model", "{bert}", "--out-dir", "{root}/p"], {},
         "is not a causal LM"),
        ("not_a_causal_lm_original", "benchmark_original.py", ["--model", "{bert}", *q], {}, "is not a causal LM"),
        ("not_a_model_dir", "benchmark_ewq.py", ["--model", "{root}/no-tools", "--plans-dir", "{plans}", *q], {},
         "no config.json"),
        ("eval_text_empty", "benchmark_original.py", ["--eval-text", "{root}/empty.txt", *q], {}, "is empty"),
        ("eval_text_missing", "benchmark_original.py", ["--eval-text", "{root}/missing.txt", *q], {},
         "evaluation text not found"),
        ("eval_text_too_short", "study_sensitivity.py", ["--eval-text", "{root}/notes.txt", "--plans-dir", "{plans}",
                                                         "--out-dir", "{results}"], {}, "fewer than one window"),
        ("mmlu_limit_zero", "benchmark_original.py", ["--mmlu-per-subject", "0", *q], {}, "--mmlu-per-subject"),
        ("mmlu_limit_negative", "benchmark_gguf_q8.py", ["--mmlu-per-subject", "-3", "--gguf-dir", "{plans}", *q], {},
         "--mmlu-per-subject"),
        ("llama_tools_missing", "benchmark_gguf_q4.py", ["--gguf-dir", "{plans}", *q],
         {"EWQ_LLAMA_CPP_BIN": "{root}/no-tools"}, "llama.cpp tool"),
        ("llama_tool_fails", "benchmark_gguf_q8.py", ["--gguf", "{f16}", *q], {"EWQ_LLAMA_CPP_BIN": "{root}/failing-tools"},
         "llama-bench failed (exit 3): fake failure: no space left"),
        ("gguf_not_gguf", "benchmark_gguf_q8.py", ["--gguf", "{root}/notes.txt", *q], {}, "not a GGUF file"),
        ("gguf_truncated", "benchmark_gguf_q8.py", ["--gguf", "{root}/truncated.gguf", *q], {}, "cannot read GGUF"),
        ("out_dir_not_writable_plan", "create_quantization_plan.py", ["--model", "{tiny}", "--out-dir", "/proc/self/ewq"],
         {}, "not writable"),
        ("out_dir_not_writable_original", "benchmark_original.py", ["--quick", "--out-dir", "/proc/self/ewq"], {},
         "not writable"),
        ("out_dir_under_a_file", "benchmark_gguf_q4.py", ["--quick", "--gguf-dir", "{plans}", "--out-dir",
                                                          "{root}/a-file/out"], {}, "is not a directory"),
        ("out_dir_not_writable_report", "compare_results.py", ["--results-dir", "{results}", "--out-dir",
                                                               "/proc/self/ewq"], {}, "not writable"),
        ("results_dir_missing", "compare_results.py", ["--results-dir", "{root}/nothing", "--out-dir", "{root}/r"], {},
         "results directory not found"),
        ("target_below_floor", "create_quantization_plan.py", ["--model", "{tiny}", "--target-bpw", "2",
                                                               "--out-dir", "{root}/p"], {}, "below the GGUF ladder"),
        ("target_size_nonsense", "create_quantization_plan.py", ["--model", "{tiny}", "--target-size", "big",
                                                                 "--out-dir", "{root}/p"], {}, "--target-size"),
        ("score_without_target", "create_quantization_plan.py", ["--model", "{tiny}", "--score", "random",
                                                                 "--out-dir", "{root}/p"], {}, "size budget"),
        ("unknown_flag", "benchmark_ewq.py", ["--quikc", *q], {}, "unrecognized arguments"),
        ("original_cannot_skip", "benchmark_original.py", ["--skip", "mmlu", *q], {}, "cannot skip stages"),
    ]
    if not torch.cuda.is_available():
        table.append(("cuda_without_gpu", "benchmark_original.py", ["--device", "cuda", *q], {}, "no CUDA GPU"))
    return table


def fill(value, world):
    return str(value).format(root=world["root"], results=world["results"], plans=world["plans"],
                             tiny=world["tiny"], bert=world["bert"], f16=world["f16"])


@pytest.mark.parametrize("row", rows(), ids=lambda row: row[0])
def test_bad_input_row(world, row):
    _, script, args, env_changes, fragment = row
    before = snapshot(world["root"], world["plans"])
    env = {**ENV, **{key: fill(value, world) for key, value in env_changes.items()}}
    result = run(script, *[fill(a, world) for a in args], check=False, env=env)
    assert_row(world, result, fragment)
    assert snapshot(world["root"], world["plans"]) == before
    assert not (world["root"] / "p").exists() and not (world["root"] / "r").exists()


@pytest.mark.parametrize("case", ["not_json", "misses_fields", "schema_version", "unknown_precision", "unknown_type",
                                  "edited", "other_model"])
def test_bad_plan_row(world, case):
    path, fragment = world["bad_plans"][case]
    before = snapshot(world["root"], world["plans"])
    script = "benchmark_gguf_ewq.py" if case == "other_model" else "benchmark_ewq.py"
    extra = ["--gguf-dir", world["plans"]] if script == "benchmark_gguf_ewq.py" else []
    result = run(script, "--quick", "--plan", path, *extra, "--out-dir", world["results"], check=False)
    assert_row(world, result, fragment)
    assert snapshot(world["root"], world["plans"]) == before


def test_disk_full_while_writing_a_plan(tmp_path):
    """A real write failure: the file-size limit makes write() fail (EFBIG) part-way through the plan."""
    out, tiny = tmp_path / "plans", tmp_path / "tiny"
    tiny_llama(num_layers=2).save_pretrained(tiny, safe_serialization=True)
    run("create_quantization_plan.py", "--model", tiny, "--out-dir", out)
    first = sorted(str(p) for p in out.iterdir())  # the plan, its script and its tensor types file
    assert len(first) == 3
    previous = {name: Path(name).read_bytes() for name in first}
    plan_file = next(name for name in first if name.endswith(".json"))
    Path(plan_file).write_bytes(previous[plan_file] + b"\n")  # a previous version that must survive
    previous[plan_file] += b"\n"

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = subprocess.run([sys.executable, str(ROOT / "create_quantization_plan.py"), "--model", str(tiny),
                             "--out-dir", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            preexec_fn=limit_file_size)
    assert_usage_error(result, "cannot write")
    assert "File too large" in result.stderr
    assert {name: Path(name).read_bytes() for name in first} == previous
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(n).name for n in first)  # no temporary left


def test_no_space_left_in_process(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    results.write_json_atomic(target, {"old": True})

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match="No space left on device"):
        results.write_json_atomic(target, {"new": True})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True} and [p.name for p in tmp_path.iterdir()] == ["result.json"]


# --- faults: killed runs ---------------------------------------------------------------------

def wait_for(condition, process, timeout=600):
    start = time.time()
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the fault was injected:\n{process.stderr.read()[-2000:]}")
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError("the awaited state never came")
        time.sleep(0.1)


def checkpoint_state(out_dir):
    files = list((out_dir / checkpoint.CHECKPOINT_DIR).glob("*.json"))
    if not files:
        return {}
    try:
        return json.loads(files[0].read_text())
    except (json.JSONDecodeError, OSError):
        return {}


def start_original(out_dir, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "benchmark_original.py"), "--quick", "--out-dir", str(out_dir),
                             *extra], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def previous_results(pipeline, out_dir):
    shutil.copytree(pipeline["results"], out_dir)
    return {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}


def test_sigterm_mid_run_leaves_previous_results_and_no_partial_file(pipeline, tmp_path):
    out = tmp_path / "results"
    before = previous_results(pipeline, out)
    process = start_original(out)
    # the KLD reference is being written: the worst moment, a large temporary file exists
    wait_for(lambda: list((out / checkpoint.CHECKPOINT_DIR).glob(".*.partial")), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and "terminated" in stderr and "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.rglob("*") if p.name.endswith(results.PARTIAL_SUFFIX)]


def test_sigkill_then_resume_ends_with_identical_numbers(pipeline, tmp_path):
    out = tmp_path / "results"
    before = previous_results(pipeline, out)
    process = start_original(out)
    wait_for(lambda: "mmlu" in checkpoint_state(out).get("partial", {}), process)
    process.kill()
    process.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched by the killed run
    path = Path(run("benchmark_original.py", "--quick", "--out-dir", out, "--resume").stdout.split()[-1])
    resumed = json.loads(path.read_text())
    assert resumed["resumed_stages"] == ["perplexity", "mmlu (partial)"]
    reference = pipeline["files"]["original"]
    for keys in (("perplexity", "per_window_nll"), ("perplexity", "ppl"), ("mmlu", "per_question_correct"),
                 ("mmlu", "accuracy"), ("generation", "outputs"), ("generation", "summarization")):
        a, b = resumed["metrics"], reference["metrics"]
        for key in keys:
            a, b = a[key], b[key]
        assert a == b, keys
    name = resumed["metrics"]["perplexity"]["kld_reference"]["file"]
    assert np.array_equal(np.load(out / name), np.load(pipeline["results"] / name))
    assert not (out / checkpoint.CHECKPOINT_DIR).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(results.PARTIAL_SUFFIX)]  # the killed run's temp is gone


def test_checkpoint_of_another_run_is_refused_and_ignored_without_resume(tmp_path):
    first = checkpoint.Checkpoint(tmp_path, "stem", {"settings": "a"}, resume=False)
    first.finish("perplexity", {"ppl": 1.0})
    assert checkpoint.Checkpoint(tmp_path, "stem", {"settings": "a"}, resume=True).finished("perplexity") == {"ppl": 1.0}
    with pytest.raises(UserError, match="belongs to another run"):
        checkpoint.Checkpoint(tmp_path, "stem", {"settings": "b"}, resume=True)
    assert checkpoint.Checkpoint(tmp_path, "stem", {"settings": "b"}, resume=False).finished("perplexity") is None


def test_stale_partials_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".result.json.{dead.pid}.abcd1234.partial"
    live = tmp_path / f".result.json.{os.getpid()}.efgh5678.partial"
    stale.write_text("half")
    live.write_text("half")
    assert results.remove_stale_partials(tmp_path) == [stale]
    assert live.exists() and not stale.exists()


def test_staged_dir_replaces_the_target_with_the_umask_mode_or_leaves_it(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with results.staged_dir(target) as staging:
            (staging / "half.bin").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging directory left behind
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    mask = os.umask(0o022)
    try:
        with results.staged_dir(target) as staging:
            (staging / "new.bin").write_text("new")
    finally:
        os.umask(mask)
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700: others may read a model put in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- large but legal inputs ------------------------------------------------------------------

def plan_of(model_dir, tmp_path):
    out = run("create_quantization_plan.py", "--model", model_dir, "--out-dir", tmp_path / "plans").stdout.split()
    return json.loads(Path(out[0]).read_text())


def test_sharded_model_plans_like_the_single_file(tmp_path):
    model = tiny_llama(num_layers=3)
    model.save_pretrained(tmp_path / "single", safe_serialization=True)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    single, sharded = plan_of(tmp_path / "single", tmp_path / "a"), plan_of(tmp_path / "sharded", tmp_path / "b")
    strip = lambda plan: [(t["hf_name"], t["entropy_bits"], t["llama_type"]) for t in plan["tensors"]]  # noqa: E731
    assert strip(single) == strip(sharded)


def test_tied_embedding_model(tmp_path):
    tiny_llama(num_layers=2, tie=True).save_pretrained(tmp_path / "tied", safe_serialization=True)
    plan = plan_of(tmp_path / "tied", tmp_path)
    names = [t["hf_name"] for t in plan["tensors"]]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    embed = next(t for t in plan["tensors"] if t["hf_name"] == "model.embed_tokens.weight")
    assert embed["gguf_name"] == "token_embd.weight" and embed["reason"] == "keep:embedding"


def test_mixed_bf16_fp16_fp32_tensors(tmp_path):
    model = tiny_llama(num_layers=2)
    model.save_pretrained(tmp_path / "mixed", safe_serialization=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    mixed = {name: tensor.to(dtypes[i % 3]) for i, (name, tensor) in enumerate(sorted(state.items()))}
    (tmp_path / "mixed" / "model.safetensors").unlink()
    save_file(mixed, str(tmp_path / "mixed" / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_of(tmp_path / "mixed", tmp_path)
    assert {t["dtype"] for t in plan["tensors"]} == {"BF16", "F16", "F32"}
    assert len(plan["tensors"]) == len(mixed)
    assert all(0 < t["entropy_bits"] <= 8 for t in plan["tensors"] if len(t["shape"]) == 2)


# --- --dry-run -------------------------------------------------------------------------------

DRY_RUNS = [
    ("create_quantization_plan.py", ["--out-dir", "{root}/dry"]),
    ("create_quantization_plan.py", ["--target-size", "50MiB", "--score", "random", "--no-keep-embeddings",
                                     "--out-dir", "{root}/dry"]),
    ("benchmark_original.py", ["--quick", "--out-dir", "{root}/dry"]),
    ("benchmark_ewq.py", ["--quick", "--plans-dir", "{plans}", "--out-dir", "{root}/dry"]),
    ("benchmark_gguf_q4.py", ["--quick", "--gguf-dir", "{root}/dry-gguf", "--out-dir", "{root}/dry"]),
    ("benchmark_gguf_q8.py", ["--quick", "--gguf-dir", "{plans}", "--out-dir", "{root}/dry", "--resume"]),
    ("benchmark_gguf_ewq.py", ["--quick", "--plans-dir", "{plans}", "--gguf-dir", "{plans}", "--out-dir", "{root}/dry"]),
    ("study_sensitivity.py", ["--plans-dir", "{plans}", "--out-dir", "{root}/dry"]),
    ("compare_results.py", ["--results-dir", "{results}", "--out-dir", "{root}/dry"]),
]


@pytest.mark.parametrize("script,args", DRY_RUNS, ids=[f"{s}-{i}" for i, (s, _) in enumerate(DRY_RUNS)])
def test_dry_run_validates_prints_and_writes_nothing(world, script, args):
    before = snapshot(world["root"], world["plans"])
    result = run(script, "--dry-run", *[fill(a, world) for a in args])
    assert result.stdout.startswith("dry run: inputs are valid") and "write " in result.stdout
    assert snapshot(world["root"], world["plans"]) == before
    assert not (world["root"] / "dry").exists() and not (world["root"] / "dry-gguf").exists()


def test_sensitivity_study_resumes_with_identical_rows(tiny_model_dir):
    """The study's other long run: interrupted after some units, resumed from the rows saved so far."""
    from ewq import study
    from ewq.backends import hf
    from ewq.metrics import perplexity
    from ewq.plan import PlanParams
    from ewq.plan.create import create_plan

    plan = create_plan(str(tiny_model_dir), PlanParams())
    model = hf.load_model(tiny_model_dir, "cpu", torch.float32)
    tokens = [int(t) for t in torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))]
    service = study.study_service(model, tokens, perplexity.WindowSpec(64, 32, 4, 4), None)
    levels = (study.Level.BLOCK, study.Level.KIND)
    full = study.measure(service, plan, levels)

    saved = []

    def killed_after_five(rows):
        saved[:] = [dict(r) for r in rows]
        if len(rows) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.measure(service, plan, levels, on_row=killed_after_five)
    resumed = study.measure(service, plan, levels, done=saved)
    assert len(saved) == 5 and len(resumed["units"]) == len(full["units"]) == 12 + 7
    assert resumed["units"] == full["units"] and resumed["correlations"] == full["correlations"]
