"""Checkpoints of a benchmark run, so that a killed run continues where it stopped (--resume).

    <out-dir>/.checkpoints/<result stem>.json           finished stages, partial stage items
    <out-dir>/.checkpoints/<result stem>.logprobs.npy   the original's KLD reference, once complete

Every save is an atomic rewrite. A checkpoint carries a fingerprint (variant, model hash,
settings digest, weights read back) and is only resumed by the same run; the finished result
and its reference file are moved into <out-dir> together at the end, so an interrupted run never
replaces the previous result of the same name. Stages are deterministic, so a resumed run ends
with the same numbers as an uninterrupted one, except timings and memory, which are measured.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..console import log
from ..errors import UserError
from ..fileio import remove_stale_partials, write_json_atomic

CHECKPOINT_DIR = ".checkpoints"


class Checkpoint:
    def __init__(self, out_dir: Path, stem: str, fingerprint: dict, resume: bool):
        self.dir = Path(out_dir) / CHECKPOINT_DIR
        self.path = self.dir / f"{stem}.json"
        self.stem = stem
        self.state: dict = {"fingerprint": fingerprint, "stages": {}, "partial": {}}
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.dir)
        if not resume:
            return
        if not self.path.is_file():
            log(f"--resume: no checkpoint {self.path}; starting from the beginning")
            return
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"checkpoint {self.path} is unreadable ({error}); re-run without --resume") from None
        if saved.get("fingerprint") != fingerprint:
            raise UserError(f"checkpoint {self.path} belongs to another run (model, settings or weights differ); "
                            "re-run without --resume")
        self.state = saved
        log(f"--resume: finished stages {sorted(saved['stages']) or 'none'}; partial "
            + (", ".join(f"{k} {len(v)} items" for k, v in saved["partial"].items()) or "none"))

    def finished(self, stage: str) -> dict | None:
        return self.state["stages"].get(stage)

    def partial(self, stage: str) -> list:
        return list(self.state["partial"].get(stage, []))

    def save_partial(self, stage: str, items: list) -> None:
        self.state["partial"][stage] = list(items)
        write_json_atomic(self.path, self.state)

    def finish(self, stage: str, result: dict) -> None:
        self.state["stages"][stage] = result
        self.state["partial"].pop(stage, None)
        write_json_atomic(self.path, self.state)

    def discard(self, stage: str) -> None:
        """Forget a finished stage whose outputs are gone: it runs again."""
        self.state["stages"].pop(stage, None)

    def stage(self, stage: str, compute: Callable[[list, Callable[[list], None]], dict]) -> dict:
        """The stage's result: from the checkpoint if finished, else compute(done, save) where
        `done` holds the items saved by an interrupted run and `save` checkpoints the items so far."""
        result = self.finished(stage)
        if result is None:
            result = compute(self.partial(stage), lambda items: self.save_partial(stage, items))
            self.finish(stage, result)
        return result

    def file(self, suffix: str) -> Path:
        """A file that belongs to this run until it is committed (e.g. '.logprobs.npy')."""
        return self.dir / f"{self.stem}{suffix}"

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()  # only if no other run keeps a checkpoint here
        except OSError:
            pass
