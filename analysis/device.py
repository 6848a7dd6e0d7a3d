"""Where the analysis runs, and how much memory it may take there.

``--device`` (auto, cpu, cuda, cuda:N) is shared by ``tunevec extract``, ``analyze`` and ``attribute``: ``auto``
is the first CUDA device when torch sees one, else the CPU, so a CPU-only machine (and CI) never needs CUDA.
``--max-memory`` is the memory the command may take on that device: the cost estimate is checked against it
instead of what the system reports free, and on CUDA it is also enforced (torch's per-process memory fraction),
so an estimate that was wrong fails with an out-of-memory error instead of taking the whole card.
"""

from __future__ import annotations

import re

import torch

from tunevec.analysis.options import DEVICE_CHOICES, format_size
from tunevec.core.errors import TunevecError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device ``spec`` names; ``auto`` picks ``cuda:0`` when CUDA is available, else ``cpu``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise TunevecError(f"--device must be {DEVICE_CHOICES}, got {spec!r}")
    if not torch.cuda.is_available():
        raise TunevecError(
            f"--device {spec}: this torch ({torch.__version__}) sees no CUDA device; run with --device cpu "
            "(or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise TunevecError(
            f"--device {spec}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on ``device``: CUDA's free memory, or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def limit_memory(device: torch.device, max_memory: int | None) -> None:
    """On CUDA, cap what this process's allocator may take at ``max_memory`` (torch raises beyond it)."""
    if max_memory is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory / total), device)


def describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200, 139.8 GiB)`` or ``cpu (16 threads)``, for the estimate line."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {format_size(props.total_memory)})"
    return f"cpu ({torch.get_num_threads()} threads)"
