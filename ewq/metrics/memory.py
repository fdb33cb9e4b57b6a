"""Memory, measured the same way for every variant: peak RSS of this process (VmHWM) on CPU;
on GPU also torch's peak allocation and NVML's count of this process's device memory."""
from __future__ import annotations

import os
import resource


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def snapshot() -> dict:
    rss = _status_kib("VmRSS")
    peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"rss_bytes": rss * 1024 if rss else None, "peak_rss_bytes": peak * 1024}
    result.update(gpu_snapshot())
    return result


def reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def gpu_snapshot() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    result = {"torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
              "torch_peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        mine = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory is not None]
        result["nvml_process_used_bytes"] = sum(mine) if mine else None
        result["nvml_device_used_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    except Exception as error:  # NVML missing or not permitted: say so in the result
        result["nvml_error"] = f"{type(error).__name__}: {error}"
    return result
