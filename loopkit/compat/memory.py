"""HF's memory metrics (`skip_memory_metrics=False`): host and device memory per stage.

Stages are Trainer.__init__ ("init"), train ("train"), evaluate ("eval") and predict
("test"). For each, with HF's names, in bytes:

    <stage>_mem_cpu_alloc_delta    resident set size at the end minus at the start
    <stage>_mem_cpu_peaked_delta   peak resident set size above the end (sampled, >= 0)
    <stage>_mem_gpu_alloc_delta    (CUDA) torch.cuda.memory_allocated end minus start
    <stage>_mem_gpu_peaked_delta   (CUDA) max_memory_allocated above the end

"init" is reported with the first of train / eval / test, with `before_init_mem_cpu`
(and `_gpu`). An evaluation inside train() is not measured on its own (HF's rule).

Cost: a daemon thread samples the resident set size every millisecond while a stage runs
(HF spins without sleeping); stages start and end with a `gc.collect()` and, on CUDA, an
`empty_cache()`, as in HF.
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

import torch

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set size, in bytes (/proc on Linux, else psutil)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as file:
            return int(file.read().split()[1]) * _PAGE_BYTES
    except OSError:
        import psutil  # optional: only where /proc is missing

        return int(psutil.Process().memory_info().rss)


class _PeakSampler:
    """Sample resident_bytes every `interval_s` on a daemon thread until stopped."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        return self.peak


class MemoryTracker:
    """HF's TrainerMemoryTracker with explicit stage names (see the module docstring).

    Args:
        enabled: `not args.skip_memory_metrics`; disabled, every call does nothing.
        device: the device whose memory is tracked besides the host's (CUDA only).
    """

    def __init__(self, enabled: bool, device: torch.device | str) -> None:
        self.enabled = enabled
        self.cuda = enabled and torch.device(device).type == "cuda"
        self.stage: str | None = None
        self.cpu: dict[str, dict[str, int]] = {}
        self.gpu: dict[str, dict[str, int]] = {}
        self.init_reported = False
        self._sampler: _PeakSampler | None = None
        self._begin: tuple[int, int] = (0, 0)

    def start(self, stage: str) -> None:
        """Start measuring `stage` (ignored inside another stage, e.g. eval within train)."""
        if not self.enabled or self.stage is not None:
            return
        self.stage = stage
        gc.collect()
        gpu = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
            gpu = torch.cuda.memory_allocated()
        self._begin = (resident_bytes(), gpu)
        self._sampler = _PeakSampler()

    def stop(self, stage: str, metrics: dict[str, Any] | None = None) -> None:
        """End `stage` and add its metrics (and, the first time, init's) to `metrics`."""
        if not self.enabled or self.stage != stage or self._sampler is None:
            return
        peak = self._sampler.stop()
        self._sampler = None
        gc.collect()
        now = resident_bytes()
        begin_cpu, begin_gpu = self._begin
        self.cpu[stage] = {
            "begin": begin_cpu,
            "alloc": now - begin_cpu,
            "peaked": max(0, peak - now),
        }
        if self.cuda:
            torch.cuda.empty_cache()
            gpu_now = torch.cuda.memory_allocated()
            self.gpu[stage] = {
                "begin": begin_gpu,
                "alloc": gpu_now - begin_gpu,
                "peaked": max(0, torch.cuda.max_memory_allocated() - gpu_now),
            }
        self.stage = None
        if metrics is not None:
            self._report(stage, metrics)

    def _report(self, stage: str, metrics: dict[str, Any]) -> None:
        stages = [stage]
        if not self.init_reported and "init" in self.cpu and stage != "init":
            stages.insert(0, "init")
            self.init_reported = True
        for name in stages:
            for kind in ("alloc", "peaked"):
                if name in self.cpu:
                    metrics[f"{name}_mem_cpu_{kind}_delta"] = self.cpu[name][kind]
                if name in self.gpu:
                    metrics[f"{name}_mem_gpu_{kind}_delta"] = self.gpu[name][kind]
        if stages[0] == "init":
            metrics["before_init_mem_cpu"] = self.cpu["init"]["begin"]
            if "init" in self.gpu:
                metrics["before_init_mem_gpu"] = self.gpu["init"]["begin"]


__all__ = ["MemoryTracker", "resident_bytes"]
