"""GGUF tensor names of a Hugging Face model, from the converter's own source of truth.

The GGUF architecture comes from the registry of the vendored convert_hf_to_gguf.py (its
`conversion` package maps each HF architecture class to a converter class with a `model_arch`),
and the names from the tensor-name map of the vendored gguf-py that the converter itself uses.
Both run in a child process (converter_child.py, a program of its own) with the vendored packages
on its path, so they never mix with the gguf package this process has imported. A tensor the map cannot name (one the converter merges,
splits or drops, such as MoE experts stacked into one tensor) gets None; plan.create refuses a plan
with a matrix that is neither named nor rearranged (below).
The same child then runs the converter itself, dry (lazy tensors: shapes, no data, nothing
written), and reports what it writes for every checkpoint tensor: GGUF names and shapes. A plan
checks its names against that (plan.create): a matrix the converter drops or renames is refused when
the plan is made, not found missing when the file is read back. For a matrix the converter
rearranges (splits, transposes, reshapes: DeepSeek's kv_b_proj into attn_k_b and attn_v_b), the
child also runs the converter on the matrix's flat positions, which tells where each element of
each output comes from (an index map, ewq.rearranged): the plan follows the tensors as written.
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
from . import toolchain

CHILD = Path(__file__).with_name("converter_child.py")  # runs with the vendored converter on its path


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
    source = toolchain.converter().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(source / "gguf-py")])}
    with tempfile.TemporaryDirectory(prefix="ewq-maps-") as maps:
        request = {"config": config, "names": hf_names, "dir": str(model_dir), "maps": maps}
        result = subprocess.run([sys.executable, "-P", str(CHILD)], input=json.dumps(request),
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
