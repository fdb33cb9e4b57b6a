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
same file, per arithmetic.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from .. import assets
from ..console import log
from ..data import wiki
from ..errors import UserError
from ..fileio import ensure_writable_dir, read_cache, write_json_atomic
from ..llamacpp.quantizers import ImportanceMatrix
from ..quant_types import Arithmetic, LlamaType
from ..rearranged import Part
from .service import Group, SensitivityService
from .swap import Change

CACHE_PREFIX = "kld_sensitivity_"


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

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @cached_property
    def tokens(self) -> torch.Tensor:
        from ..backends import hf

        return calibration_tokens(hf.load_tokenizer(self.model_dir), self.spec)

    @cached_property
    def service(self) -> SensitivityService:
        """The model, loaded once, and its unperturbed outputs on the calibration windows."""
        from ..backends import hf

        model = hf.load_model(self.model_dir, self.device, self.dtype, self.device_map)
        check_in_place(model)
        return SensitivityService(model, self.tokens, self.imatrix, self.parts)

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

        kld = self.service.measure_groups(groups, types, done, on_group=save)
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
        measured = self.service.activation_errors(entries, arithmetic)
        rows = {name: measured.get(name, {}) for name in names}
        log(f"activations: {arithmetic.value} rounding of {sum(map(bool, rows.values()))} matrices' inputs measured "
            f"in {time.time() - started:.0f} s")
        self._write(path, fingerprint, "activations", {**cached, arithmetic.value: {**cached.get(arithmetic.value, {}),
                                                                                    **rows}})
        return rows

    def kld_of(self, changes: list[Change], arithmetic: Arithmetic = Arithmetic.WEIGHTS, last: bool = False) -> float:
        """The mean KLD on the calibration windows with every change at once (a whole plan), in `arithmetic`.
        `last`: the model's last use here; it is measured without keeping its tensors to restore (no second
        copy of the model on the host) and let go afterwards (a later measurement loads it again)."""
        kld = self.service.measure(changes, arithmetic=arithmetic, restore=not last).mean_kld
        if last:
            del self.service  # the cached_property's value: the model and its references are freed
        return kld
