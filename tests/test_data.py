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
