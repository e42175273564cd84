"""Peak memory of a phase: ``PeakRSS`` (the process's resident set, sampled in a thread) and
``PeakMemory`` (that on CPU; torch's peak allocated device memory on CUDA). The pipeline records a
round's peak with it (``tasks/steps.py``); the benchmarks (``benchmarks/``) each phase's."""

from __future__ import annotations

import resource
import threading

import torch


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Samples the resident set size in a thread; ``peak`` is the phase's maximum in MiB."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = _rss_mb()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


class PeakMemory(PeakRSS):
    """Peak memory of a phase in MiB: the process's resident set on CPU; on CUDA the peak of
    torch's allocated device memory (reset at entry)."""

    def __init__(self, device, interval: float = 0.02):
        super().__init__(interval)
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        return super().__enter__()

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2**20
            return
        super().__exit__(*exc)
