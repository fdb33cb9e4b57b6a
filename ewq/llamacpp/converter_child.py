"""The child program of llamacpp.names: run as `python converter_child.py` with the vendored
convert_hf_to_gguf.py and its gguf-py first on PYTHONPATH (never imported by the project).

Reads a JSON request on stdin: {config, names, dir, maps}; writes one JSON line on stdout:
    {"arch": GGUF architecture or None, "names": {hf name: GGUF name or None},
     "written": {checkpoint tensor: [[GGUF name, shape, index-map key or None], ...]} or None,
     "failure": why the dry conversion failed, or None}
The index maps of rearranged tensors are saved as <maps>/<key>.npy (see index_maps).
"""
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
