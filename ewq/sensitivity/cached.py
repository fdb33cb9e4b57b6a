"""The kld score's measurements of one model, cached on disk (like lm-eval's CachingLM: a wrapper
around the measuring service, explicit about what it stores).

For every ranked matrix t (or group g of them), ΔKLD_g(ref) is the mean KLD(original ‖ perturbed)
over every token of the calibration windows, with only g's members on their reference type. The
windows are non-overlapping, from the calibration-role text, never the evaluation text. The
measurements are cached per model hash, importance matrix and calibration tokens in the plans
directory, saved after every group: an interrupted run, or a second plan at another budget, goes on
from what is there. The tokenizer and the model are loaded once, on first need: a plan whose every
group is cached loads no model until it measures the whole plan (plan.create's additivity check).
The activation errors of llama.cpp's arithmetic (SensitivityService.activation_errors) are cached in the
same file, per arithmetic. The unperturbed model's logits on the windows (the reference every KLD is
taken against, as llama-perplexity's --kl-divergence-base file holds them) are saved beside it, per
model, calibration tokens, compute dtype and device kind, exact float32 [windows, context, vocab]:
such a plan measures only the perturbed model.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .. import assets
from ..console import log
from ..data import wiki
from ..errors import UserError
from ..fileio import atomic_path, ensure_writable_dir, read_cache, write_json_atomic
from ..llamacpp.quantizers import ImportanceMatrix
from ..quant_types import Arithmetic, LlamaType
from ..rearranged import Part
from .service import Group, Reference, SensitivityService
from .swap import Change

CACHE_PREFIX = "kld_sensitivity_"
REFERENCE_PREFIX = "kld_reference_"


@dataclass(frozen=True)
class CalibrationSpec:
    windows: int  # non-overlapping windows of the calibration text
    context: int  # tokens per window; every token is scored


def calibration_tokens(tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """[windows, context] token ids from the calibration-role text."""
    ids = tokenizer.encode(wiki.calibration_text(assets.wiki_file()), add_special_tokens=False)
    need = spec.windows * spec.context
    if len(ids) < need:
        raise UserError(f"the calibration text has {len(ids)} tokens, fewer than {spec.windows} windows of "
                        f"{spec.context}; lower --calibration-windows")
    return torch.tensor(ids[:need]).reshape(spec.windows, spec.context)


def cache_path(cache_dir: Path, model_hash: str, imatrix_digest: str | None, tokens: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> Path:
    """One cache per model, importance matrix, calibration tokens and compute dtype (float32's key as before
    the dtype was chosen)."""
    keyed = [model_hash, imatrix_digest, tokens.tolist()] + ([] if dtype is torch.float32 else [str(dtype)])
    key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{CACHE_PREFIX}{model_hash}_{key}.json"


def references_file(cache_dir: Path, model_hash: str, spec: CalibrationSpec, tokens: torch.Tensor,
                    dtype_name: str, where: str) -> tuple[Path, dict]:
    """The reference logits' file and its fingerprint: one per model, calibration tokens, compute dtype and
    where the model runs (`where`: a device kind or a device map; a GPU's sums differ from the CPU's in their
    last bits)."""
    fingerprint = {"model_hash": model_hash, "calibration": asdict(spec), "dtype": dtype_name,
                   "where": where, "tokens": hashlib.sha256(json.dumps(tokens.tolist()).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{REFERENCE_PREFIX}{model_hash}_{key}.safetensors", fingerprint


def save_references(path: Path, references: list[Reference], fingerprint: dict) -> None:
    """Window i's [rows, vocab] float32 logits as tensor `logits.i` of one safetensors file (no stacked copy),
    the fingerprint in its metadata; written atomically."""
    from safetensors.torch import save_file

    tensors = {f"logits.{i}": r.logits.detach().cpu().contiguous() for i, r in enumerate(references)}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True)})


def load_references(path: Path, fingerprint: dict, windows: int, rows: int) -> list[Reference] | None:
    """The references saved for `fingerprint`, `windows` of [rows, vocab], on the CPU; None where the file is
    missing, unreadable or holds something else (then measured again, not an error)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if json.loads((handle.metadata() or {}).get("fingerprint", "null")) != fingerprint:
                return None
            logits = [handle.get_tensor(f"logits.{i}") for i in range(windows)]
    except (OSError, SafetensorError, ValueError):
        log(f"sensitivity: reference file {path} is unreadable; measuring again")
        return None
    if any(window.dtype != torch.float32 or window.ndim != 2 or window.shape[0] != rows for window in logits):
        return None
    return [Reference(window) for window in logits]


def check_in_place(model: torch.nn.Module) -> None:
    """A UserError if accelerate offloaded part of the model (to CPU beside GPUs, or to disk): an offloaded
    layer's parameters are placeholders that its hooks fill for each forward pass, so a tensor swapped
    there would not be the one that runs."""
    placed = {str(where) for where in (getattr(model, "hf_device_map", None) or {}).values()}
    offloaded = placed & {"cpu", "disk"}
    if offloaded and placed - {"cpu"}:
        raise UserError(f"the device map puts part of the model on {' and '.join(sorted(offloaded))} beside GPUs: the "
                        "kld measurement swaps tensors in place, so every layer must sit on a GPU (more GPUs, "
                        "--dtype bfloat16) or all on --device cpu")


@dataclass
class CachedSensitivity:
    """Where and how the kld score measures one model: its directory, hash and rearranged parts, the
    importance matrix, the calibration windows, the device, the compute dtype and the cache directory."""
    model_dir: Path
    model_hash: str
    spec: CalibrationSpec
    device: str
    cache_dir: Path
    imatrix: ImportanceMatrix | None = None
    imatrix_digest: str | None = None
    parts: dict[str, Part] | None = None
    dtype: torch.dtype = torch.float32  # the decoder's; the output projection runs in float32 (service.py)
    device_map: str | None = None  # accelerate's strategy over several GPUs (hf.load_model); None: all on `device`
    _service: SensitivityService | None = field(default=None, init=False, repr=False)

    @property
    def dtype_name(self) -> str:
        from ..backends.hf import dtype_name

        return dtype_name(self.dtype)

    @cached_property
    def tokens(self) -> torch.Tensor:
        from ..backends import hf

        return calibration_tokens(hf.load_tokenizer(self.model_dir), self.spec)

    def service(self, replay: bool = True) -> SensitivityService:
        """The model, loaded once, and its unperturbed outputs on the calibration windows: from the reference
        file where the first use needs no replay of recorded layers (`replay` False: whole-plan measurements),
        else from an unperturbed pass that records them and writes the file."""
        if self._service is not None:
            return self._service
        from ..backends import hf

        model = hf.load_model(self.model_dir, self.device, self.dtype, self.device_map)
        check_in_place(model)
        where = f"device map {self.device_map}" if self.device_map else torch.device(self.device).type
        path, fingerprint = references_file(ensure_writable_dir(self.cache_dir), self.model_hash, self.spec,
                                            self.tokens, self.dtype_name, where)
        references = None if replay else load_references(path, fingerprint, *self.tokens.shape)
        if references is not None:
            log(f"sensitivity: the unperturbed logits from {path}")
        self._service = SensitivityService(model, self.tokens, self.imatrix, self.parts, references=references)
        if references is None:
            save_references(path, self._service.references, fingerprint)
        return self._service

    def _cache(self) -> tuple[Path, dict]:
        """The cache file and its fingerprint."""
        path = cache_path(ensure_writable_dir(self.cache_dir), self.model_hash, self.imatrix_digest, self.tokens,
                          self.dtype)
        fingerprint = {"model_hash": self.model_hash, "imatrix": self.imatrix_digest, "calibration": asdict(self.spec),
                       **({} if self.dtype is torch.float32 else {"dtype": self.dtype_name})}
        return path, fingerprint

    def _write(self, path: Path, fingerprint: dict, section: str, rows: dict) -> None:
        """Write one section of the cache file, the others as they are on disk."""
        data = read_cache(path, fingerprint, "sensitivity")
        data.update({"fingerprint": fingerprint, "method": __doc__.strip(), section: rows})
        write_json_atomic(path, data)

    def group_klds(self, groups: list[Group], types: dict[str, LlamaType]) -> dict[str, float]:
        """ΔKLD_g(types) for every group, from the cache where measured with the same types, else
        measured (and cached after each group)."""
        path, fingerprint = self._cache()
        cached = read_cache(path, fingerprint, "sensitivity").get("groups", {})
        swapped = {g.name: {e.hf_name: types[e.hf_name].value for e in g.entries} for g in groups}
        done = {g.name: cached[g.name]["kld"] for g in groups
                if g.name in cached and cached[g.name].get("reference_types") == swapped[g.name]}
        if len(done) == len(groups):
            log(f"sensitivity: {len(done)} groups/tensors from {path}")
            return done
        log(f"sensitivity: measuring {len(groups) - len(done)} groups/tensors ({len(done)} cached) on "
            f"{self.spec.windows} x {self.spec.context} calibration tokens, {self.device}, "
            f"{self.dtype_name}; cache {path}")
        started = time.time()

        def save(kld: dict[str, float]) -> None:
            rows = {**cached, **{name: {"reference_types": swapped[name], "kld": value} for name, value in kld.items()}}
            self._write(path, fingerprint, "groups", rows)

        kld = self.service().measure_groups(groups, types, done, on_group=save)
        log(f"sensitivity: {len(groups) - len(done)} groups/tensors measured in {time.time() - started:.0f} s")
        return kld

    def activation_errors(self, entries: list, arithmetic: Arithmetic) -> dict[str, dict[str, float]]:
        """hf_name -> {activation type: r} (SensitivityService.activation_errors), cached per arithmetic;
        every name of `entries` is a key (empty where no input is rounded)."""
        path, fingerprint = self._cache()
        cached = read_cache(path, fingerprint, "sensitivity").get("activations", {})
        names = [e.hf_name for e in entries]
        if all(name in cached.get(arithmetic.value, {}) for name in names):
            log(f"activations: {arithmetic.value} rounding of {len(names)} matrices' inputs from {path}")
            return {name: cached[arithmetic.value][name] for name in names}
        started = time.time()
        measured = self.service(replay=False).activation_errors(entries, arithmetic)
        rows = {name: measured.get(name, {}) for name in names}
        log(f"activations: {arithmetic.value} rounding of {sum(map(bool, rows.values()))} matrices' inputs measured "
            f"in {time.time() - started:.0f} s")
        self._write(path, fingerprint, "activations", {**cached, arithmetic.value: {**cached.get(arithmetic.value, {}),
                                                                                    **rows}})
        return rows

    def in_context(self, changes: list[Change], groups: list[Group],
                   arithmetic: Arithmetic = Arithmetic.WEIGHTS) -> tuple[float, dict[str, float]]:
        """(the whole plan's KLD, group name -> its marginal ΔKLD in the plan; SensitivityService.in_context),
        cached per plan (its types), grouping and arithmetic, saved after each group: an interrupted correction
        round goes on from there."""
        path, fingerprint = self._cache()
        key = hashlib.sha256(json.dumps([arithmetic.value, sorted((e.hf_name, t.value) for e, t in changes),
                                         [g.name for g in groups]]).encode()).hexdigest()[:16]
        cached = read_cache(path, fingerprint, "sensitivity").get("in_context", {})
        row = cached.get(key, {})
        if "whole" in row and all(g.name in row["groups"] for g in groups):
            log(f"in context: {len(groups)} groups' marginals from {path}")
            return row["whole"], row["groups"]
        started = time.time()

        def save(whole: float, marginal: dict[str, float]) -> None:
            self._write(path, fingerprint, "in_context", {**cached, key: {"whole": whole, "groups": dict(marginal)}})

        kld, marginal = self.service(replay=False).in_context(changes, groups, arithmetic, save, row.get("groups"))
        log(f"in context: {len(groups)} groups' marginals measured in {time.time() - started:.0f} s")
        return kld, marginal

    def kld_of(self, changes: list[Change], arithmetic: Arithmetic = Arithmetic.WEIGHTS, last: bool = False) -> float:
        """The mean KLD on the calibration windows with every change at once (a whole plan), in `arithmetic`.
        `last`: the model's last use here; it is measured without keeping its tensors to restore (no second
        copy of the model on the host) and let go afterwards (a later measurement loads it again)."""
        kld = self.service(replay=False).measure(changes, arithmetic=arithmetic, restore=not last).mean_kld
        if last:
            self._service = None  # the model and its references are freed
        return kld
