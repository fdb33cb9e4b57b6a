"""GPU paths without a GPU: torch's CUDA calls, NVML and the llama.cpp bindings replaced by stubs (two
devices the way CUDA_VISIBLE_DEVICES and a container present them)."""
import sys
import time
import types
import uuid

import pytest
import torch

from ewq.metrics import memory
from ewq.results.record import Result

UUID_A, UUID_B = uuid.UUID(int=0xA), uuid.UUID(int=0xB)


class FakeNvml(types.ModuleType):
    """Two physical GPUs in NVML's order A, B; used bytes per device, processes by host pid."""

    def __init__(self, used, processes):
        super().__init__("pynvml")
        self.used, self.processes = used, processes  # {uuid text: bytes}, {uuid text: [(pid, bytes)]}
        self.order = [f"GPU-{UUID_A}", f"GPU-{UUID_B}"]

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.order[index]

    def nvmlDeviceGetHandleByUUID(self, text):
        assert text in self.order, text
        return text

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=self.used[handle])

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in self.processes.get(handle, [])]


@pytest.fixture
def one_visible_gpu(monkeypatch):
    """CUDA_VISIBLE_DEVICES=1: torch's device 0 is NVML's device 1 (B)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=UUID_B))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: 0)  # llama.cpp: torch allocates nothing
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda i=None: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i=None: None)


def install(monkeypatch, nvml):
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_the_device_torch_sees_is_found_in_nvml_by_uuid_not_by_index(monkeypatch, one_visible_gpu):
    import os

    gpu_a, gpu_b = f"GPU-{UUID_A}", f"GPU-{UUID_B}"
    install(monkeypatch, FakeNvml({gpu_a: 70 << 30, gpu_b: 3 << 30}, {gpu_b: [(os.getpid(), 2 << 30)]}))
    figures = memory.gpu_snapshot()
    assert figures["nvml_device_used_bytes"] == 3 << 30  # B's, not A's (NVML index 0)
    assert figures["nvml_process_used_bytes"] == 2 << 30 and "nvml_process_note" not in figures


def test_a_pid_hidden_by_a_container_is_said_not_read_as_zero(monkeypatch, one_visible_gpu):
    gpu_a, gpu_b = f"GPU-{UUID_A}", f"GPU-{UUID_B}"
    install(monkeypatch, FakeNvml({gpu_a: 0, gpu_b: 5 << 30}, {gpu_b: [(123456789, 5 << 30)]}))  # the host's pid
    figures = memory.gpu_snapshot()
    assert figures["nvml_process_used_bytes"] is None and "pid namespace" in figures["nvml_process_note"]


def test_a_run_that_torch_did_not_allocate_for_gets_nvml_s_sampled_peak(monkeypatch, one_visible_gpu):
    """llama.cpp on a GPU: torch's peak is 0; the sampled device peak above the start is the figure the
    report shows (it was a blank cell), and never the host's RSS in its place."""
    gpu_a, gpu_b = f"GPU-{UUID_A}", f"GPU-{UUID_B}"
    nvml = FakeNvml({gpu_a: 60 << 30, gpu_b: 1 << 30}, {})
    install(monkeypatch, nvml)
    with memory.GpuPeak(poll_seconds=0.001) as peak:
        nvml.used[gpu_b] = 9 << 30  # the model loaded and ran...
        time.sleep(0.05)
        nvml.used[gpu_b] = 2 << 30  # ...and freed most of it before the end
    figures = memory.snapshot(peak)
    assert figures["nvml_run_start_bytes"] == 1 << 30 and figures["nvml_run_peak_bytes"] == 8 << 30
    result = Result({"metrics": {"memory_peak": figures}})
    assert result.peak_memory_bytes == 8 << 30
    del figures["nvml_run_peak_bytes"]
    assert Result({"metrics": {"memory_peak": figures}}).peak_memory_bytes is None


def test_without_a_gpu_the_peak_is_the_process_rss():
    figures = memory.snapshot(memory.GpuPeak().__enter__())
    assert "torch_peak_allocated_bytes" not in figures and figures["peak_rss_bytes"] > 0
    assert Result({"metrics": {"memory_peak": figures}}).peak_memory_bytes == figures["peak_rss_bytes"]


def test_a_gguf_on_a_gpu_host_without_a_cuda_build_runs_on_the_cpu_unless_cuda_was_asked_for(monkeypatch):
    from ewq.backends import llamacpp
    from ewq.errors import UserError

    monkeypatch.setattr(llamacpp, "_import_llama", lambda: types.SimpleNamespace(llama_supports_gpu_offload=lambda: False))
    assert llamacpp.gguf_device("auto", "cuda") == "cpu" and llamacpp.gguf_device("cpu", "cpu") == "cpu"
    with pytest.raises(UserError, match="EWQ_CUDA=1 bash scripts/setup.sh"):
        llamacpp.gguf_device("cuda", "cuda")
    monkeypatch.setattr(llamacpp, "_import_llama", lambda: types.SimpleNamespace(llama_supports_gpu_offload=lambda: True))
    assert llamacpp.gguf_device("auto", "cuda") == "cuda"
