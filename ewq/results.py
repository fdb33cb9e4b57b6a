"""Result files: atomic writes, environment capture, and the benchmark JSON layout."""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

RESULT_SCHEMA_VERSION = 1


def ensure_writable_dir(path: Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"output directory {path} is not writable")
    return path


@contextmanager
def atomic_path(target: Path):
    """Yield a temporary path beside `target`; rename it over `target` only on success."""
    target = Path(target)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        if temp.stat().st_mode & 0o777 == 0o600:  # mkstemp's mode: give the file the usual umask-based one
            temp.chmod(0o666 & ~_umask())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: Path, text: str, mode: int | None = None) -> None:
    try:
        with atomic_path(target) as temp:
            temp.write_text(text)
            if mode is not None:
                temp.chmod(mode)
    except OSError as error:
        raise UserError(f"cannot write {target}: {error.strerror or error}") from None


def write_json_atomic(target: Path, data: dict) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, allow_nan=False) + "\n")


def environment() -> dict:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["nvidia_driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as error:  # pynvml missing or no NVML: record why
            env["nvidia_driver"] = f"unavailable ({type(error).__name__})"
    return env


def timestamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())
