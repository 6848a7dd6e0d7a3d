"""Wall time and peak memory of each stage of a command, measured in the process itself.

Peak host memory is the kernel's high-water mark of resident memory (VmHWM), reset at the start of every stage by
writing 5 to /proc/self/clear_refs, so each stage reports its own peak rather than the process's so far; where
that file cannot be written the peak is the process's (``rss_scope: "process"``). VmHWM counts the touched pages of
memory-mapped checkpoints too, so the anonymous part (RssAnon, sampled) is reported beside it. Peak device memory is torch's
``max_memory_allocated`` on CUDA, reset the same way. The figures go into the command's JSON output and are printed,
and they are what ``bench/bench_scaling.py`` and ``bench/device_check.sh`` read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from tunevec.analysis.options import format_size


def _status_bytes(field: str) -> int | None:
    """A memory figure of /proc/self/status (``VmHWM``, ``RssAnon``...) in bytes, None where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _AnonPeak:
    """The largest anonymous resident memory (RssAnon) seen while running, sampled every 20 ms by a thread.

    VmHWM also counts the pages of memory-mapped checkpoint files a stage touched, which the kernel can drop
    under pressure; RssAnon is the memory that must fit (what analysis/estimate.py predicts). A peak shorter
    than the sampling interval can be missed."""

    def __init__(self) -> None:
        self.peak = _status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tunevec-meter")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = _status_bytes("RssAnon")
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        values = [v for v in (self.peak, _status_bytes("RssAnon")) if v is not None]
        return max(values) if values else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Per-stage seconds, peak RSS and peak device memory: ``with meter.stage("probe"): ...``."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.stages: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        scoped = _reset_hwm()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        anon = _AnonPeak()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            self.stages[name] = {
                "seconds": round(seconds, 3),
                "peak_rss_bytes": _status_bytes("VmHWM"),
                "peak_anon_bytes": anon.stop(),
                "rss_scope": "stage" if scoped else "process",
                "peak_device_bytes": int(torch.cuda.max_memory_allocated(self.device)) if cuda else None,
            }

    def as_dict(self) -> dict:
        return {"device": str(self.device), "stages": dict(self.stages)}

    def lines(self, prefix: str = "") -> list[str]:
        out = []
        for name, s in self.stages.items():
            parts = [f"{s['seconds']:.1f} s"]
            if s["peak_rss_bytes"] is not None:
                parts.append(f"peak RSS {format_size(s['peak_rss_bytes'])}")
            if s.get("peak_anon_bytes") is not None:
                parts.append(f"of it anonymous {format_size(s['peak_anon_bytes'])}")
            if s["peak_device_bytes"] is not None:
                parts.append(f"peak {self.device} {format_size(s['peak_device_bytes'])}")
            out.append(f"{prefix}{name}: " + ", ".join(parts))
        return out
