"""Memory, measured the same way for every variant: peak RSS of this process (VmHWM) on CPU; on GPU,
over every device this process sees, torch's peak allocation and NVML's figures.

NVML numbers devices its own way, not as torch does under CUDA_VISIBLE_DEVICES, so each torch device is
found in NVML by its UUID. NVML lists processes by host PID, which a container's PID namespace hides:
where this process's PID is not among a device's processes, the process figure is None and the result
says why. llama.cpp allocates outside torch (torch's peak is then 0), so a sampler (GpuPeak) polls NVML's
device memory during the run: its peak above the level at the start is what the run added.
"""
from __future__ import annotations

import os
import resource
import threading

POLL_SECONDS = 0.05


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def snapshot(gpu_peak: "GpuPeak | None" = None) -> dict:
    rss = _status_kib("VmRSS")
    peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"rss_bytes": rss * 1024 if rss else None, "peak_rss_bytes": peak * 1024}
    result.update(gpu_snapshot())
    if gpu_peak is not None:
        result.update(gpu_peak.figures())
    return result


def reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def nvml_handles() -> list:
    """NVML's handle of every device torch sees, in torch's order, found by UUID (by index only where
    torch gives no UUID). Raises whatever NVML raises (missing, not permitted)."""
    import pynvml
    import torch

    pynvml.nvmlInit()
    handles = []
    for index in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is None:
            handles.append(pynvml.nvmlDeviceGetHandleByIndex(index))
        else:
            text = str(uuid)
            handles.append(pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"))
    return handles


def device_used_bytes(handles: list) -> int:
    import pynvml

    return sum(pynvml.nvmlDeviceGetMemoryInfo(handle).used for handle in handles)


def gpu_snapshot() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    count = torch.cuda.device_count()
    allocated = [torch.cuda.max_memory_allocated(i) for i in range(count)]
    result = {"torch_peak_allocated_bytes": sum(allocated),
              "torch_peak_reserved_bytes": sum(torch.cuda.max_memory_reserved(i) for i in range(count)),
              "torch_peak_allocated_bytes_per_device": allocated}
    try:
        import pynvml

        handles = nvml_handles()
        mine, pid = [], os.getpid()
        for handle in handles:
            used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == pid]
            mine.append(sum(u for u in used if u is not None) if used else None)
        result["nvml_device_used_bytes"] = device_used_bytes(handles)
        result["nvml_process_used_bytes_per_device"] = mine
        if all(m is None for m in mine):
            result["nvml_process_used_bytes"] = None
            result["nvml_process_note"] = (f"pid {pid} is not among the devices' processes (a container's pid "
                                           "namespace?): see nvml_run_peak_bytes")
        else:
            result["nvml_process_used_bytes"] = sum(m for m in mine if m is not None)
    except Exception as error:  # NVML missing or not permitted: say so in the result
        result["nvml_error"] = f"{type(error).__name__}: {error}"
    return result


class GpuPeak:
    """The peak of NVML's device memory (every device torch sees, summed) while the block runs, above its
    level at the start: what a run added, whichever library allocated it (torch or llama.cpp). A no-op
    without a GPU or NVML (figures() then says why)."""

    def __init__(self, poll_seconds: float = POLL_SECONDS):
        self.poll_seconds = poll_seconds
        self.start_bytes = self.peak_bytes = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuPeak":
        import torch

        if not torch.cuda.is_available():
            return self
        try:
            self._handles = nvml_handles()
            self.start_bytes = self.peak_bytes = device_used_bytes(self._handles)
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            return self
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.sample()

    def sample(self) -> None:
        try:
            self.peak_bytes = max(self.peak_bytes, device_used_bytes(self._handles))
        except Exception as error:  # NVML went away: keep what was measured, say so
            self.error = f"{type(error).__name__}: {error}"
            self._stop.set()

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sample()

    def figures(self) -> dict:
        if self.start_bytes is None:
            return {"nvml_run_peak_error": self.error} if self.error else {}
        return {"nvml_run_start_bytes": self.start_bytes, "nvml_run_peak_bytes": self.peak_bytes - self.start_bytes,
                **({"nvml_run_peak_error": self.error} if self.error else {})}
