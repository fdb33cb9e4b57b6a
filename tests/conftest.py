import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ewq.backends.base import Backend, Generation  # noqa: E402
from ewq.results.record import WeightsReport  # noqa: E402


def tiny_llama(num_layers=12, hidden=64, intermediate=256, vocab=128, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model_dir(tmp_path):
    model = tiny_llama()
    path = tmp_path / "tiny"
    model.save_pretrained(path, safe_serialization=True)
    return path


class BigramBackend(Backend):
    """A deterministic fake engine: the next-token distribution depends on the current token only."""

    name, device = "bigram", "cpu"

    def __init__(self, vocab=32, seed=0, scale=3.0):
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(scale * torch.randn(vocab, vocab, generator=generator), dim=-1)

    @property
    def vocab_size(self):
        return self.table.shape[0]

    def window_logprobs(self, windows, rows):
        return torch.stack([self.table[torch.tensor(window)][rows] for window in windows])

    def next_token_logprobs(self, prompts, token_ids):
        return torch.stack([self.table[prompt[-1]][token_ids] for prompt in prompts])

    def generate_greedy(self, prompt, max_new_tokens):
        tokens, token = [], prompt[-1]
        for _ in range(max_new_tokens):
            token = int(self.table[token].argmax())
            tokens.append(token)
        return Generation(tokens=tokens, ttft_s=0.01, total_s=0.01 + 0.001 * (max_new_tokens - 1))

    def weights_report(self):
        return WeightsReport(weight_bytes=0, n_weights=0)


# --- the scripts end to end (shared by the e2e test modules) -----------------------------------

ENV = {**os.environ, "EWQ_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
SCRIPTS = ("create_quantization_plan.py", "benchmark_original.py", "benchmark_ewq.py", "benchmark_gguf_q4.py",
           "benchmark_gguf_q8.py", "benchmark_gguf_ewq.py", "study_sensitivity.py", "compare_results.py")
GGUF_SCRIPTS = ("benchmark_gguf_q4.py", "benchmark_gguf_q8.py", "benchmark_gguf_ewq.py")


def run(script, *args, check=True, env=None):
    command = [sys.executable, *(["-m", script] if script.startswith(("ewq.", "benchmarks.")) else [str(ROOT / script)])]
    result = subprocess.run([*command, *map(str, args)], cwd=ROOT, env=env or ENV,
                            capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def assert_usage_error(result, fragment):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, result.stderr


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    plans, results = root / "plans", root / "results"
    plan_out = run("create_quantization_plan.py", "--out-dir", plans).stdout.split()
    run("benchmark_original.py", "--quick", "--out-dir", results)
    run("benchmark_ewq.py", "--quick", "--plans-dir", plans, "--out-dir", results)
    for script in GGUF_SCRIPTS:
        plan_args = ["--plans-dir", plans] if script == "benchmark_gguf_ewq.py" else []
        run(script, "--quick", *plan_args, "--gguf-dir", plans, "--out-dir", results)
    run("ewq.commands.bench_gguf", "F16", "--quick", "--gguf-dir", plans, "--out-dir", results)
    files = {json.loads(p.read_text())["variant"]: json.loads(p.read_text()) for p in results.glob("*.json")}
    return {"plan": Path(plan_out[0]), "script": Path(plan_out[1]), "results": results, "files": files, "root": root}


