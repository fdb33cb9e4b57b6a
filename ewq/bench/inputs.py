"""What every variant is evaluated on: the tokens of the evaluation text, the MMLU questions and
prompts, and the generation requests; tokenized once, by the model's own tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import assets
from ..data import mmlu as mmlu_data
from ..data import hub, prompts, wiki
from ..errors import UserError
from ..metrics import generation
from .settings import GENSIM_WIKI, WIKITEXT2, EvalSettings

def load_eval_text(source: str) -> str:
    if source == GENSIM_WIKI:
        return wiki.eval_text(assets.wiki_file())
    if source == WIKITEXT2 or hub.is_local_table(source):
        text = "".join(row["text"] for row in hub.rows(hub.WIKITEXT2, source))
        if not text.strip():
            raise UserError(f"evaluation text {source} is empty")
        return text
    path = Path(source)
    if not path.is_file():
        raise UserError(f"evaluation text not found: {source} (use '{GENSIM_WIKI}', '{WIKITEXT2}', "
                        "a .txt file, or a .parquet/.jsonl/.csv table with wikitext's `text` column)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"evaluation text {source} is empty")
    return text


@dataclass
class EvalData:
    tokens: list[int]
    mmlu_prompts: list[list[int]]
    mmlu_sample: list[mmlu_data.Question]
    request_prompts: list[list[int]]
    requests: list[prompts.Request]
    settings: EvalSettings

    @property
    def longest_sequence(self) -> int:
        """Tokens a backend must hold at once: a window, an MMLU prompt, or a prompt plus its answer."""
        return max(self.settings.context, max(map(len, self.mmlu_prompts)),
                   max(map(len, self.request_prompts)) + self.settings.max_new_tokens)


def mmlu_inputs(tokenizer, settings: EvalSettings) -> tuple[list[mmlu_data.Question], list[list[int]]]:
    """The MMLU sample (stratified, seeded) and its prompts' token ids, with the settings' exemplars."""
    questions = mmlu_data.load_questions(assets.mmlu_file())
    sample = mmlu_data.stratified_sample(questions, settings.mmlu_per_subject, settings.seed)
    shots = mmlu_data.exemplars(questions, sample, settings.mmlu_shots, settings.seed)
    # as lm-evaluation-harness encodes a context: with the tokenizer's own special tokens (a BOS where it
    # adds one: Llama-3, Gemma; none for SmolLM2)
    mmlu_prompts = [tokenizer.encode(mmlu_data.prompt(q, shots.get(q.subject, []))) for q in sample]
    return sample, mmlu_prompts


def load_data(tokenizer, settings: EvalSettings) -> EvalData:
    text = load_eval_text(settings.eval_text)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    sample, mmlu_prompts = mmlu_inputs(tokenizer, settings)
    requests = prompts.generation_requests(assets.wiki_file(), settings.gen_per_task, settings.summaries,
                                           settings.summaries_from)
    if not requests:
        raise UserError("no generation requests: raise --gen-per-task or --summaries")
    request_prompts = [generation.prompt_tokens(tokenizer, r) for r in requests]
    return EvalData(tokens, mmlu_prompts, sample, request_prompts, requests, settings)


