"""Command-line options shared by ``extract``, ``analyze`` and ``attribute`` (no torch import: ``tunevec --help``
builds every command's parser and should stay fast)."""

from __future__ import annotations

import argparse
import re

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--max-memory``, the same for every command that computes on tensors."""
    parser.add_argument(
        "--device",
        default="auto",
        help=f"where tensors are computed: {DEVICE_CHOICES} (default auto: CUDA when torch sees it, else cpu)",
    )
    parser.add_argument(
        "--max-memory",
        type=parse_size,
        help="memory the command may use on its device (e.g. 20GiB, 64GB); the estimate printed before the run "
        "is checked against it instead of the memory reported free, and on CUDA it is enforced",
    )


def parse_size(text: str) -> int:
    """Bytes from ``20GiB``, ``20G`` (both 2^30-based), ``20GB`` (10^9), ``512MiB`` or a plain number of bytes."""
    match = _SIZE.match(str(text))
    if match is None:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 20GiB, 64GB, 512MiB)")
    number, unit, binary, byte = match.groups()
    decimal = bool(byte) and not binary and unit != ""  # "GB" is 10^9; "G" and "GiB" are 2^30
    base = 1000 if decimal else 1024
    value = float(number) * base ** _POWERS[unit.lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"memory size must be positive, got {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """``3.2 GiB``, ``512 MiB``: sizes as the messages print them."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if abs(n) >= 1024**power:
            return f"{n / 1024**power:.1f} {unit}"
    return f"{int(n)} B"


def parse_layers(text: str) -> tuple[int, int]:
    """``START:END``: decoder layers START..END-1, as a Python slice (both ends given)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if match is None or int(match.group(1)) >= int(match.group(2)):
        raise argparse.ArgumentTypeError(
            f"--layers takes START:END with START < END (e.g. 24:30), got {text!r}"
        )
    return int(match.group(1)), int(match.group(2))
