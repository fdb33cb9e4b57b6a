"""Plain English text from a MediaWiki XML dump (the extract shipped in the gensim wheel).

Articles are split by a hash of their title into disjoint roles, so that text used for
perplexity never serves as a summarization source or (later) as calibration text:
    hash % 10 in 0..5 -> "eval", 6..7 -> "summarization", 8..9 -> "calibration".
"""
from __future__ import annotations

import bz2
import hashlib
import html
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

ROLES = {"eval": range(0, 6), "summarization": range(6, 8), "calibration": range(8, 10)}


@dataclass(frozen=True)
class Article:
    title: str
    lead: str  # text before the first section heading
    body: str  # the rest


def role_of(title: str) -> str:
    bucket = int(hashlib.sha256(title.encode()).hexdigest(), 16) % 10
    return next(role for role, buckets in ROLES.items() if bucket in buckets)


def _strip_nested(text: str, opener: str, closer: str) -> str:
    """Remove balanced opener...closer spans (templates {{..}}, tables {|..|})."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opener, i):
            depth += 1
            i += len(opener)
        elif depth and text.startswith(closer, i):
            depth -= 1
            i += len(closer)
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


_LINK_FILE = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://\S+\s*([^\]]*)\]")
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_QUOTES = re.compile(r"'{2,}")


def clean_markup(wikitext: str) -> str:
    text = html.unescape(wikitext)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _LINK_FILE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _LIST_MARK.sub("", text)
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if line and not line.startswith(("|", "!", "{", "}")))
    return re.sub(r"[ \t]+", " ", text).strip()


def _split_lead(cleaned_with_headings: str) -> tuple[str, str]:
    match = _HEADING.search(cleaned_with_headings)
    if not match:
        return cleaned_with_headings, ""
    return cleaned_with_headings[: match.start()].strip(), cleaned_with_headings[match.start():].strip()


def read_articles(path: Path) -> list[Article]:
    """All main-namespace, non-redirect articles of a (bz2) MediaWiki XML dump, in file order."""
    try:
        opener = bz2.open if str(path).endswith(".bz2") else open
        with opener(path, "rb") as handle:
            root = ET.parse(handle).getroot()
    except (OSError, ET.ParseError, EOFError) as error:
        raise UserError(f"cannot read Wikipedia dump {path}: {error}") from None
    articles = []
    for page in root.iter():
        if not page.tag.endswith("page"):
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in page.iter()}
        if fields.get("ns") is None or fields["ns"].text != "0" or "redirect" in fields:
            continue
        raw = fields["text"].text or "" if "text" in fields else ""
        if raw.lstrip().upper().startswith("#REDIRECT"):
            continue
        cleaned = clean_markup(raw)
        lead, body = _split_lead(cleaned)
        body = _HEADING.sub(r"\1", body)
        if lead or body:
            articles.append(Article(title=fields["title"].text or "", lead=lead, body=body))
    if not articles:
        raise UserError(f"no articles found in {path}")
    return articles


def articles_for(path: Path, role: str) -> list[Article]:
    return [a for a in read_articles(path) if role_of(a.title) == role]


def eval_text(path: Path) -> str:
    """The perplexity text: every "eval" article, title line then text, blank line between."""
    parts = [f"{a.title}\n{a.lead}\n{a.body}".strip() for a in articles_for(path, "eval")]
    return "\n\n".join(parts)


def calibration_text(path: Path) -> str:
    """The calibration text (importance matrix, sensitivity measurement): every "calibration"
    article, disjoint from the evaluation and summarization text by role."""
    return "\n\n".join(f"{a.title}\n{a.lead}\n{a.body}" for a in articles_for(path, "calibration"))
