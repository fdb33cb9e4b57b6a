"""BLEU (sacrebleu) and ROUGE-1/2/L F1 (rouge-score, Porter stemming)."""
from __future__ import annotations

from typing import Sequence

from .stats import bootstrap_se, mean_se

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU with a bootstrap SE over items."""
    pairs = list(zip(hypotheses, references))
    return {
        "score": corpus_bleu(hypotheses, references),
        "se": bootstrap_se(pairs, lambda sample: corpus_bleu([h for h, _ in sample], [r for _, r in sample])),
        "n": len(pairs),
    }


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Mean F1 ± SE for each ROUGE type."""
    scorer = _rouge_scorer()
    scores = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
    return {kind: mean_se([s[kind].fmeasure for s in scores]).to_json() for kind in ROUGE_TYPES}
