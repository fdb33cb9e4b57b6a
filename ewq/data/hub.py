"""Standard datasets by name through 🤗 datasets, or a local file in the same schema.

    wikitext2  Salesforce/wikitext, config wikitext-2-raw-v1, split test, column `text`
               (the rows joined as they are, as llama.cpp's and lm-eval's wikitext perplexity read them)
    billsum    FiscalNote/billsum, split test, columns `text` (the bill) and `summary`

A name goes to the hub (or the local 🤗 cache); a path to a .parquet, .jsonl/.json or .csv file
with the same columns is read through the same code, so both are the same method (and the local
path is how the tests, and users without the hub, run it). Any failure is one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class HubSet:
    repo: str
    config: str | None
    split: str
    columns: tuple[str, ...]  # the columns every row must have


WIKITEXT2 = HubSet("Salesforce/wikitext", "wikitext-2-raw-v1", "test", ("text",))
BILLSUM = HubSet("FiscalNote/billsum", None, "test", ("text", "summary"))
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def is_local_table(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_FORMATS


def rows(dataset: HubSet, source: str) -> list[dict]:
    """The rows of `dataset` from the hub (source = its name) or from the local file `source`."""
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise UserError(f"the `datasets` package is not importable ({error}); run scripts/setup.sh") from None
    local = Path(source) if is_local_table(source) else None
    if local is not None and not local.is_file():
        raise UserError(f"{source} not found")
    try:
        if local is not None:
            table = load_dataset(LOCAL_FORMATS[local.suffix.lower()], data_files=str(local), split="train")
        else:
            table = load_dataset(dataset.repo, dataset.config, split=dataset.split)
    except Exception as error:  # the hub, the network and the file formats raise many kinds
        where = source if local is not None else f"{dataset.repo} from the hub"
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot load {where}: {type(error).__name__}: {first}") from None
    missing = [column for column in dataset.columns if column not in table.column_names]
    if missing:
        raise UserError(f"{source} lacks the column(s) {', '.join(missing)} of {dataset.repo} "
                        f"(it has {', '.join(table.column_names)})")
    return [{column: row[column] for column in dataset.columns} for row in table]
