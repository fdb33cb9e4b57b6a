"""GGUF tensor names of a Hugging Face model, from the converter's own source of truth.

The GGUF architecture comes from the registry of the vendored convert_hf_to_gguf.py (its
`conversion` package maps each HF architecture class to a converter class with a `model_arch`),
and the names from the tensor-name map of the vendored gguf-py that the converter itself uses.
Both run in a child process with the vendored packages on its path, so they never mix with the
gguf package this process has imported. A tensor the map cannot name (one the converter merges,
splits or drops, such as MoE experts stacked into one tensor) gets None; plan.build refuses a plan
whose matrices are not all named.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ..errors import UserError
from . import build as tools

_NAMER = r"""
import json, logging, sys
logging.disable(logging.WARNING)
request = json.load(sys.stdin)
import gguf
from conversion import get_model_class
config = request["config"]
arch = None
for name in config.get("architectures") or []:
    try:
        arch = get_model_class(name).model_arch
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
json.dump({"arch": gguf.MODEL_ARCH_NAMES[arch], "names": names}, sys.stdout)
"""


def gguf_names(config: dict, hf_names: list[str]) -> tuple[str | None, dict[str, str | None]]:
    """(GGUF architecture name or None if the converter does not know the model, hf name -> GGUF name or None)."""
    source = tools.converter().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(source / "gguf-py")])}
    result = subprocess.run([sys.executable, "-c", _NAMER], input=json.dumps({"config": config, "names": hf_names}),
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise UserError(f"naming the tensors with the vendored converter failed: {lines[-1] if lines else 'no output'}")
    answer = json.loads(result.stdout)
    return answer["arch"], answer["names"]
