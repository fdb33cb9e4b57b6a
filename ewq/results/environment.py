"""Where a result was measured: versions, processor, GPU and driver; and when."""
from __future__ import annotations

import os
import platform
import time


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
