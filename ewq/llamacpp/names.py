"""GGUF tensor names of a Hugging Face model, from the converter's own source of truth.

The GGUF architecture comes from the registry of the vendored convert_hf_to_gguf.py (its
`conversion` package maps each HF architecture class to a converter class with a `model_arch`),
and the names from the tensor-name map of the vendored gguf-py that the converter itself uses.
Both run in a child process with the vendored packages on its path, so they never mix with the
gguf package this process has imported. A tensor the map cannot name (one the converter merges,
splits or drops, such as MoE experts stacked into one tensor) gets None; plan.build refuses a plan
whose matrices are not all named.
The same child then runs the converter itself, dry (lazy tensors: shapes, no data, nothing
written), and reports what it writes for every checkpoint tensor: GGUF names and shapes. A plan
checks its names against that (plan.build): a matrix the converter splits, transposes or drops is
refused when the plan is made, not found missing when the file is read back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import build as tools

_NAMER = r"""
import json, logging, os, sys
logging.disable(logging.WARNING)
request = json.load(sys.stdin)
import gguf
from conversion import get_model_class
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
written, failure = {}, None
try:  # the converter, dry: what it writes for each checkpoint tensor
    from pathlib import Path
    model = get_model_class(arch_class)(Path(request["dir"]), gguf.LlamaFileType.MOSTLY_F16, Path(os.devnull), dry_run=True)
    modify = model.modify_tensors

    def recording(data, hf_name, bid):
        for new_name, out in modify(data, hf_name, bid):
            written.setdefault(hf_name, []).append([new_name, list(out.shape)])
            yield new_name, out

    model.modify_tensors = recording
    model.gguf_writer.add_tensor = lambda *args, **kwargs: None
    model.prepare_tensors()
except Exception as error:
    written, failure = None, f"{type(error).__name__}: {error}"
json.dump({"arch": gguf.MODEL_ARCH_NAMES[arch], "names": names, "written": written, "failure": failure}, sys.stdout)
"""


@dataclass(frozen=True)
class Naming:
    arch: str | None  # GGUF architecture; None if the converter does not know the model
    names: dict[str, str | None]  # hf name -> GGUF name (None: the map has none)
    written: dict[str, list[tuple[str, tuple[int, ...]]]] | None  # checkpoint tensor -> what the converter writes
    failure: str | None = None  # why the dry conversion failed (then `written` is None)


def gguf_names(model_dir: Path, config: dict, hf_names: list[str]) -> Naming:
    """The GGUF names of `hf_names` from the converter's tensor map, and what the converter writes."""
    source = tools.converter().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(source / "gguf-py")])}
    request = {"config": config, "names": hf_names, "dir": str(model_dir)}
    result = subprocess.run([sys.executable, "-c", _NAMER], input=json.dumps(request),
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise UserError(f"naming the tensors with the vendored converter failed: {lines[-1] if lines else 'no output'}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    written = answer.get("written")
    if written is not None:
        written = {hf: [(name, tuple(shape)) for name, shape in out] for hf, out in written.items()}
    return Naming(answer["arch"], answer["names"], written, answer.get("failure"))
