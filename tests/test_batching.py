"""Batched, device-side scoring equals one sequence at a time: the HF backend on several
architectures, the metrics' chunking, auto batch size, and llama.cpp's logits-only-where-needed."""
import numpy as np
import pytest
import torch

from conftest import BigramBackend
from ewq.backends import hf
from ewq.errors import UserError
from ewq.metrics import mmlu, perplexity
from ewq.results.record import WeightsReport

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def tiny(kind: str):
    import transformers as t

    configs = {
        "llama": lambda: t.LlamaConfig(**SMALL),
        "qwen2": lambda: t.Qwen2Config(**SMALL),
        "cohere": lambda: t.CohereConfig(**SMALL, logit_scale=0.5),  # scale applied after the LM head
        "gemma2": lambda: t.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=5.0),  # soft-capping after it
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128),
    }
    torch.manual_seed(0)
    return t.AutoModelForCausalLM.from_config(configs[kind]()).eval()


def backend(model, batch_size):
    return hf.HFBackend(model, "cpu", "tiny", WeightsReport(0, 0), batch_size=batch_size)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "cohere", "gemma2", "gpt_neox"])
def test_hf_batches_equal_the_full_forward_one_sequence_at_a_time(kind):
    model = tiny(kind)
    generator = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 96, (5, 24), generator=generator).tolist()
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (3, 17, 9, 30, 9, 1, 22)]
    rows = slice(11, 23)
    with torch.inference_mode():
        full = [torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].float(), -1) for w in windows]
        last = [torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(), -1) for p in prompts]
    expected_rows = torch.stack([f[rows] for f in full])
    letters = [5, 17, 42, 95]
    expected_letters = torch.stack([scores[letters] for scores in last])
    for batch_size in (1, 3, None):
        scorer = backend(model, batch_size)
        got_rows = scorer.window_logprobs(windows, rows)
        assert got_rows.shape == (5, 12, 96)
        torch.testing.assert_close(got_rows, expected_rows, atol=2e-5, rtol=1e-5)
        got_letters = scorer.next_token_logprobs(prompts, letters)  # right-padded, in the caller's order
        torch.testing.assert_close(got_letters, expected_letters, atol=2e-5, rtol=1e-5)
        assert torch.equal(got_letters.argmax(1), expected_letters.argmax(1))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "cohere", "gemma2", "gpt_neox"])
def test_batched_greedy_decoding_gives_the_tokens_of_one_request_at_a_time(kind):
    """Left-padded batches (prompts of 1..30 tokens): the tokens of the timed batch-1 path, and each
    one the argmax of a full forward over prompt + tokens so far (no cache, no padding)."""
    model = tiny(kind)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (3, 17, 9, 30, 9, 1, 22)]
    one_at_a_time = torch.tensor([backend(model, 1).generate_greedy(p, 12).tokens for p in prompts])
    for batch_size in (3, None):
        got = backend(model, batch_size).greedy_tokens(prompts, 12)
        assert got.shape == (7, 12) and torch.equal(got, one_at_a_time)
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, one_at_a_time.tolist()):
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            assert logits.argmax(-1).tolist() == tokens


def test_perplexity_kld_and_mmlu_equal_at_every_batch_size(tmp_path):
    """Per-window NLL, KLD, same-top-1 and every MMLU answer, batch 1 vs 3 vs 4 (KLD windows end
    inside a batch), against the reference recorded at batch 1."""
    model = tiny("llama")
    tokens = torch.randint(0, 96, (400,), generator=torch.Generator().manual_seed(2)).tolist()
    spec = perplexity.WindowSpec(context=32, stride=16, max_windows=11, kld_windows=5)
    record = np.zeros((5 * 16, 96), dtype=np.float16)
    perplexity.evaluate(backend(model, 1), tokens, spec, record=record)
    other = tiny("llama")
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01 * torch.randn_like(param))
    from ewq.data import mmlu as mmlu_data
    from test_metrics import LetterTok

    questions = [mmlu_data.Question("s", f"q{i}" * (1 + i % 5), ("a", "b", "c", "d"), i % 4) for i in range(13)]
    prompts = [LetterTok().encode(mmlu_data.prompt(q, [])) for q in questions]
    results = {}
    for batch_size in (1, 3, 4):
        ppl = perplexity.evaluate(backend(other, batch_size), tokens, spec, reference=record)
        answers = mmlu.evaluate(backend(other, batch_size), LetterTok(), questions, prompts, every=5)
        results[batch_size] = (ppl, answers["per_question_correct"])
    base, base_answers = results[1]
    assert base["kld"]["n_windows"] == 5 and base["ppl"]["n_windows"] == 11 and base["kld"]["mean"] > 0
    for ppl, answers in results.values():
        assert answers == base_answers
        np.testing.assert_allclose(ppl["per_window_nll"], base["per_window_nll"], rtol=1e-6)
        np.testing.assert_allclose(ppl["per_window_kld"], base["per_window_kld"], rtol=1e-4, atol=1e-9)
        assert ppl["per_window_same_top1"] == base["per_window_same_top1"]


class RunsOutOfMemory(BigramBackend):
    """Fails like a GPU that holds two sequences at most."""

    def window_logprobs(self, windows, rows):
        return self.in_batches(windows, self._run(lambda batch: super(RunsOutOfMemory, self).window_logprobs(batch, rows)))

    def greedy_tokens(self, prompts, max_new_tokens, decoded=None):
        one = super(RunsOutOfMemory, self).greedy_tokens
        return self.longest_first(prompts, self._run(lambda idx: one([prompts[i] for i in idx], max_new_tokens)),
                                  "decode_batch_size")

    def _run(self, work):
        def run(batch):
            if len(batch) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return work(batch)
        return run


def test_auto_batch_size_halves_on_out_of_memory_and_a_fixed_one_fails_in_one_line():
    windows = torch.randint(0, 32, (7, 10), generator=torch.Generator().manual_seed(3)).tolist()
    expected = BigramBackend().window_logprobs(windows, slice(2, 9))
    auto = RunsOutOfMemory()
    auto.batch_size, auto.auto_batch = 8, True
    assert torch.equal(auto.window_logprobs(windows, slice(2, 9)), expected) and auto.batch_size == 2
    auto.decode_batch_size = 16  # decoding has a size of its own, halved on its own
    prompts = [window[:n] for window, n in zip(windows, (3, 9, 1, 5, 7, 2, 4))]
    assert torch.equal(auto.greedy_tokens(prompts, 5), BigramBackend().greedy_tokens(prompts, 5))
    assert auto.decode_batch_size == 2 and auto.batch_size == 2
    fixed = RunsOutOfMemory()
    fixed.batch_size = 4
    with pytest.raises(UserError, match="out of memory at batch size 4"):
        fixed.window_logprobs(windows, slice(2, 9))


def test_compute_dtype_follows_the_checkpoint_on_gpu(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "dtype": "bfloat16"}')
    assert hf.compute_dtype("cuda", "auto", tmp_path) is torch.bfloat16
    assert hf.compute_dtype("cpu", "auto", tmp_path) is torch.float32
    assert hf.compute_dtype("cuda", "float16", tmp_path) is torch.float16
    (tmp_path / "config.json").write_text('{"model_type": "llama", "torch_dtype": "float32"}')
    assert hf.compute_dtype("cuda", "auto", tmp_path) is torch.float32
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert hf.compute_dtype("cuda", "auto", tmp_path) is torch.float16


def bos_adding_tiny_model(path):
    """A tiny random Llama with SmolLM2's tokenizer made to add its BOS (<|im_start|>, id 1) to every text,
    as Llama-3's and Gemma's do."""
    import json

    from conftest import tiny_llama
    from ewq import assets

    model = tiny_llama(num_layers=2, vocab=49152)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.config.max_position_embeddings = 2048  # lm-eval cuts contexts to it: every MMLU prompt fits
    model.save_pretrained(path, safe_serialization=True)
    assets.copy_default_tokenizer(path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    tokenizer["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                                   "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                   "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    return path


@pytest.mark.parametrize("model", ["smollm2", "bos"])
def test_our_mmlu_answers_equal_lm_evaluation_harness_on_its_own_mmlu_tasks(tmp_path, model):
    """benchmarks/lm_eval_agreement.py on one question per subject (57): lm-eval's hf backend on its own
    mmlu task definitions (only the dataset local) gives the same answer to every question and the same
    log-likelihoods, on SmolLM2 (no BOS) and on a tokenizer that adds a BOS (lm-eval leaves it to the
    tokenizer; so do our prompts)."""
    import json

    from conftest import ENV, run
    from transformers import AutoTokenizer

    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "agreement.json"
    extra = []
    if model == "bos":
        model_dir = bos_adding_tiny_model(tmp_path / "bos")
        assert AutoTokenizer.from_pretrained(model_dir).encode("Answer:")[0] == 1
        extra = ["--model", model_dir]
    result = run("benchmarks.lm_eval_agreement", "--per-subject", "1", "--json", out, *extra, env=env)
    figures = json.loads(out.read_text())
    assert figures["n"] == 57 and figures["differ"] == [], result.stdout
    assert figures["bos"] is (model == "bos")
    assert figures["max_abs_gap"] < 1e-3
    assert "answers that differ: 0 of 57" in result.stdout and "lm-eval's own mmlu tasks" in result.stdout
