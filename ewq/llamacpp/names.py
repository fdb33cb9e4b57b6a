"""GGUF tensor names of a Hugging Face model, from the converter's own source of truth.

The GGUF architecture comes from the registry of the vendored convert_hf_to_gguf.py (its
`conversion` package maps each HF architecture class to a converter class with a `model_arch`),
and the names from the tensor-name map of the vendored gguf-py that the converter itself uses.
Both run in a child process with the vendored packages on its path, so they never mix with the
gguf package this process has imported. A tensor the map cannot name (one the converter merges,
splits or drops, such as MoE experts stacked into one tensor) gets None; plan.build refuses a plan
with a matrix that is neither named nor rearranged (below).
The same child then runs the converter itself, dry (lazy tensors: shapes, no data, nothing
written), and reports what it writes for every checkpoint tensor: GGUF names and shapes. A plan
checks its names against that (plan.build): a matrix the converter drops or renames is refused when
the plan is made, not found missing when the file is read back. For a matrix the converter
rearranges (splits, transposes, reshapes: DeepSeek's kv_b_proj into attn_k_b and attn_v_b), the
child also runs the converter on the matrix's flat positions, which tells where each element of
each output comes from (an index map, ewq.converted): the plan follows the tensors as written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import UserError
from . import build as tools

_NAMER = r"""
import hashlib, json, logging, math, os, re, sys
import numpy as np
import torch
logging.disable(logging.WARNING)
request = json.load(sys.stdin)
import gguf
from conversion import get_model_class
EXPERT = re.compile(r"\.experts\.\d+\.")  # one expert's matrix: stacked with the others (ewq.experts), no map


def index_maps(modify, hf_name, bid, shape, outputs):
    # Where each element of each output comes from: the converter run on the flat positions of the
    # source (float64, exact), and on 2*position + 1, which any arithmetic on the values (a scale, an
    # offset) would not keep. One saved map per distinct content; None where a check fails.
    n = math.prod(shape)
    positions = torch.arange(n, dtype=torch.float64).reshape(shape)
    first, second = list(modify(positions, hf_name, bid)), list(modify(2 * positions + 1, hf_name, bid))
    if [[name, list(out.shape)] for name, out in first] != [o[:2] for o in outputs] or len(second) != len(first):
        return None
    keys = []
    for (_, a), (_, b) in zip(first, second):
        if a.dtype != torch.float64 or not torch.equal(b, 2 * a + 1) or not torch.equal(a, a.round()) \
                or (a.numel() and (a.min() < 0 or a.max() >= n)):
            return None
        index = a.reshape(-1).numpy().astype(np.int32 if n < 2 ** 31 else np.int64)
        key = hashlib.sha1(index.tobytes()).hexdigest()[:20] + f"_{index.dtype}"
        if not os.path.exists(os.path.join(request["maps"], key + ".npy")):
            np.save(os.path.join(request["maps"], key + ".npy"), index)
        keys.append(key)
    return keys


config = request["config"]
arch = arch_class = None
for arch_class in config.get("architectures") or []:
    try:
        arch = get_model_class(arch_class).model_arch
        break
    except NotImplementedError:
        continue
if arch is None:
    json.dump({"arch": None, "names": {}}, sys.stdout)
    sys.exit(0)
text = config.get("text_config") or config
tensor_map = gguf.get_tensor_name_map(arch, int(text.get("num_hidden_layers") or config.get("num_hidden_layers") or 0))
names = {}
for hf_name in request["names"]:
    name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    names[hf_name] = name if name and name.endswith((".weight", ".bias")) else None
written, failure, rearranged = {}, None, {}
try:  # the converter, dry: what it writes for each checkpoint tensor
    from pathlib import Path
    model = get_model_class(arch_class)(Path(request["dir"]), gguf.LlamaFileType.MOSTLY_F16, Path(os.devnull), dry_run=True)
    modify = model.modify_tensors

    def recording(data, hf_name, bid):
        outputs = list(modify(data, hf_name, bid))
        for new_name, out in outputs:
            written.setdefault(hf_name, []).append([new_name, list(out.shape), None])
        # its own outputs in another layout, or a 3-D one (experts fused in the checkpoint): mapped
        if outputs and not EXPERT.search(hf_name) and (
                data.dim() >= 3 or data.dim() == 2 and [list(out.shape) for _, out in outputs] != [list(data.shape)]):
            rearranged[hf_name] = (tuple(data.shape), bid)
        yield from outputs

    model.modify_tensors = recording
    model.gguf_writer.add_tensor = lambda *args, **kwargs: None
    model.prepare_tensors()
    for hf_name, (shape, bid) in rearranged.items():
        try:
            maps = index_maps(modify, hf_name, bid, shape, written[hf_name])
        except Exception:
            maps = None  # the converter computes the values, or keeps state: no map, the plan refuses it
        for output, key in zip(written[hf_name], maps or []):
            output[2] = key
except Exception as error:
    written, failure = None, f"{type(error).__name__}: {error}"
json.dump({"arch": gguf.MODEL_ARCH_NAMES[arch], "names": names, "written": written, "failure": failure}, sys.stdout)
"""


class Output(NamedTuple):
    """One tensor the converter writes for a checkpoint tensor."""
    name: str
    shape: tuple[int, ...]
    # where its elements come from, for a tensor the converter rearranges (split, transposed,
    # reshaped): int [numel], the flat position in the checkpoint tensor of each element in the
    # output's order; None for a tensor written as it is (or one whose values the converter computes)
    index: np.ndarray | None = None


@dataclass(frozen=True)
class Naming:
    arch: str | None  # GGUF architecture; None if the converter does not know the model
    names: dict[str, str | None]  # hf name -> GGUF name (None: the map has none)
    written: dict[str, list[Output]] | None  # checkpoint tensor -> what the converter writes
    failure: str | None = None  # why the dry conversion failed (then `written` is None)


def gguf_names(model_dir: Path, config: dict, hf_names: list[str]) -> Naming:
    """The GGUF names of `hf_names` from the converter's tensor map, and what the converter writes."""
    source = tools.converter().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(source / "gguf-py")])}
    with tempfile.TemporaryDirectory(prefix="ewq-maps-") as maps:
        request = {"config": config, "names": hf_names, "dir": str(model_dir), "maps": maps}
        result = subprocess.run([sys.executable, "-c", _NAMER], input=json.dumps(request),
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            raise UserError(f"naming the tensors with the vendored converter failed: {lines[-1] if lines else 'no output'}")
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        written, loaded = answer.get("written"), {}

        def index(key: str | None) -> np.ndarray | None:
            if key is not None and key not in loaded:
                loaded[key] = np.load(Path(maps) / f"{key}.npy")
            return None if key is None else loaded[key]

        if written is not None:
            written = {hf: [Output(name, tuple(shape), index(key)) for name, shape, key in out]
                       for hf, out in written.items()}
    return Naming(answer["arch"], answer["names"], written, answer.get("failure"))
