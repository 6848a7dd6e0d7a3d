"""The tuning-vector artifact: tau = theta_tuned - theta_base, tensor by tensor, with a versioned manifest.

Layout of an artifact folder (documented in docs/artifact-format.md)::

    V/vector.safetensors   tau for every floating-point tensor, HF tensor names, one dtype
    V/manifest.json        format, version, base/tuned fingerprints, per-tensor role, norms, sha256, policies

The manifest is written last and the folder is renamed into place, so an interrupted extraction never leaves
something that looks like a complete artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from tunevec.core.checkpoint import Checkpoint, read_safetensors_header
from tunevec.core.errors import TunevecError

FORMAT = "tunevec.tuning-vector"
VERSION = 1
TENSORS_FILE = "vector.safetensors"
MANIFEST_FILE = "manifest.json"

_TORCH_TO_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time.

    The header (names, dtypes, shapes, offsets) is known before any data is computed, so it is written first and
    tensors follow in plan order; memory never holds more than the tensor being written. The result is a plain
    safetensors file that the safetensors library reads and validates.
    """

    def __init__(
        self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ):
        self.path = path
        self._order = [name for name, _, _ in plan]
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        self._sizes: dict[str, int] = {}
        for name, dtype, shape in plan:
            numel = 1
            for d in shape:
                numel *= d
            size = numel * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._sizes[name] = size
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> str:
        """Append the next tensor of the plan; returns the sha256 of its bytes."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"writer expected {self._order[self._next]!r}, got {name!r}")
        # A view of the tensor's own memory: hashing and writing it costs no copy.
        data = (
            memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
        )
        if data.nbytes != self._sizes[name]:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, planned {self._sizes[name]}")
        self._file.write(data)
        self._next += 1
        return hashlib.sha256(data).hexdigest()

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


@dataclass
class TensorEntry:
    name: str
    shape: list[int]
    role: str
    layer: int | None
    module: str | None
    norm: float  # ||tau||_F
    base_norm: float  # ||W_base||_F over the part tau covers
    sha256: str

    @property
    def relative_change(self) -> float:
        return self.norm / self.base_norm if self.base_norm > 0 else float("inf")


@dataclass
class Manifest:
    name: str
    dtype: str
    base: dict
    tuned: dict
    tensors: dict[str, TensorEntry]
    policies: dict = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "tensors"}
        d["tensors"] = {n: e.__dict__ for n, e in self.tensors.items()}
        return d

    @classmethod
    def from_json(cls, d: dict, where: Path) -> Manifest:
        if d.get("format") != FORMAT:
            raise TunevecError(f"{where}: not a tunevec tuning vector (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise TunevecError(
                f"{where}: tuning-vector format version {d.get('version')} is not supported (this tunevec reads "
                f"version {VERSION}); re-extract it with `tunevec extract`"
            )
        try:
            tensors = {n: TensorEntry(**e) for n, e in d["tensors"].items()}
            rest = {k: d[k] for k in ("name", "dtype", "base", "tuned")}
        except (KeyError, TypeError) as exc:
            raise TunevecError(f"{where}: malformed manifest: {exc}") from exc
        return cls(**rest, tensors=tensors, policies=d.get("policies", {}), created=d.get("created", ""))


class TuningVector:
    """A tuning-vector artifact on disk, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        mpath = self.path / MANIFEST_FILE
        if not mpath.exists():
            raise TunevecError(
                f"{self.path}: no {MANIFEST_FILE}; not a tuning-vector artifact (or an interrupted extraction)"
            )
        try:
            raw = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise TunevecError(f"{mpath}: invalid JSON: {exc}") from exc
        self.manifest = Manifest.from_json(raw, mpath)
        header = read_safetensors_header(self.path / TENSORS_FILE)
        if set(header) != set(self.manifest.tensors):
            raise TunevecError(f"{self.path}: {TENSORS_FILE} and {MANIFEST_FILE} list different tensors")
        for name, info in header.items():
            if list(info.shape) != self.manifest.tensors[name].shape:
                raise TunevecError(
                    f"{self.path}: tensor {name!r} has shape {info.shape} but the manifest says "
                    f"{self.manifest.tensors[name].shape}"
                )

    @property
    def name(self) -> str:
        return self.manifest.name

    def names(self) -> list[str]:
        return list(self.manifest.tensors)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.manifest.tensors:
            raise TunevecError(f"{self.path}: vector has no tensor {name!r}")
        with safe_open(self.path / TENSORS_FILE, framework="pt") as f:
            return f.get_tensor(name)

    def stream(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = self.names() if names is None else list(names)
        with safe_open(self.path / TENSORS_FILE, framework="pt") as f:
            for name in wanted:
                yield name, f.get_tensor(name)

    def verify(self) -> None:
        """Check every tensor's sha256 against the manifest (reads the whole file)."""
        for name, tensor in self.stream():
            digest = hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            if digest != self.manifest.tensors[name].sha256:
                raise TunevecError(f"{self.path}: checksum mismatch for {name!r}; the artifact is corrupt")

    def check_base(self, base: Checkpoint) -> None:
        """Refuse a base this vector was not extracted from: fingerprint, names and shapes must agree."""
        want = self.manifest.base.get("fingerprint")
        if want != base.fingerprint():
            raise TunevecError(
                f"vector {self.name!r} ({self.path}) was extracted from a different base (fingerprint "
                f"{str(want)[:12]}…) than {base.path} ({base.fingerprint()[:12]}…); re-extract it against this base"
            )
        for name, entry in self.manifest.tensors.items():
            info = base.tensors.get(name)
            if info is None or list(info.shape) != entry.shape:
                raise TunevecError(f"vector {self.name!r}: tensor {name!r} does not match base {base.path}")


def _write_json_durably(path: Path, obj: dict) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished artifact into place; an existing one is only removed after the new one is there."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
