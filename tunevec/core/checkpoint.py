"""The one place that walks checkpoints: HF folders with single or sharded safetensors.

Analysis (extraction) and steering (injection, merge, adapters) both read tensors through ``Checkpoint``: it maps
tensor names to shards, validates the files up front (so a truncated shard fails before any work is done) and reads
one tensor at a time, so memory stays bounded by the largest tensor in flight.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tunevec.core.errors import TunevecError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors float dtype codes -> torch dtypes (also the set of codes tunevec treats as floating point).
ST_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# safetensors dtype codes -> bytes per element (the header is read without loading data).
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the file's data section
    data_start: int  # absolute offset of the data section in the file

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor's bytes are present in the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise TunevecError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _HEADER_LIMIT or 8 + header_len > size:
                raise TunevecError(f"{path}: corrupt or truncated safetensors header (length {header_len})")
            header = json.loads(f.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TunevecError(f"{path}: cannot read safetensors header: {exc}") from exc
    data_start = 8 + header_len
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise TunevecError(f"{path}: malformed header entry for {name!r}") from exc
        expected = _DTYPE_BYTES.get(dtype)
        numel = 1
        for d in shape:
            numel *= d
        if expected is not None and end - begin != numel * expected:
            raise TunevecError(
                f"{path}: tensor {name!r} has {end - begin} bytes, expected {numel * expected}"
            )
        if data_start + end > size:
            raise TunevecError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes"
            )
        out[name] = TensorInfo(name, path, dtype, shape, (begin, end), data_start)
    return out


class Checkpoint:
    """A Hugging Face model folder read tensor by tensor.

    >>> ckpt = Checkpoint("models/base")
    >>> for name, tensor in ckpt.stream():  # one tensor in memory at a time
    ...     ...
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise TunevecError(f"{self.path}: not a directory; expected a Hugging Face model folder")
        self.config = self._read_config()
        self.tensors = self._index()

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise TunevecError(f"{self.path}: no config.json; expected a Hugging Face model folder")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise TunevecError(f"{cfg}: invalid JSON: {exc}") from exc

    def _index(self) -> dict[str, TensorInfo]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise TunevecError(f"{index}: not a safetensors index (no weight_map)") from exc
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).exists():
            weight_map, files = {}, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                raise TunevecError(f"{self.path}: no safetensors weights (model.safetensors or {INDEX_FILE})")
            weight_map, files = {}, found
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.exists():
                raise TunevecError(f"{self.path}: shard {fname} named in {INDEX_FILE} is missing")
            for name, info in read_safetensors_header(fpath).items():
                if name in tensors:
                    raise TunevecError(f"{self.path}: tensor {name!r} appears in two shards")
                tensors[name] = info
        missing = set(weight_map) - set(tensors)
        if missing:
            raise TunevecError(
                f"{self.path}: {len(missing)} tensors in the index are in no shard, e.g. {sorted(missing)[0]}"
            )
        return tensors

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def num_layers(self) -> int | None:
        return self.config.get("num_hidden_layers")

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (a copy in memory; files are opened per call so nothing stays mapped)."""
        info = self.tensors.get(name)
        if info is None:
            raise TunevecError(f"{self.path}: no tensor named {name!r}")
        try:
            with safe_open(info.file, framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise TunevecError(f"{info.file}: cannot read tensor {name!r}: {exc}") from exc

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read one tensor straight from its file into ``out`` (same numel; converted to out's dtype on the way).

        No intermediate tensor: the file is mapped and copied once into memory the caller reuses, which matters
        when extraction streams gigabytes (fresh allocations per tensor cost more in page faults than the copy).
        """
        info = self.tensors.get(name)
        if info is None:
            raise TunevecError(f"{self.path}: no tensor named {name!r}")
        dtype = ST_FLOAT_DTYPES.get(info.dtype)
        numel = out.numel()
        if dtype is None or numel * _DTYPE_BYTES[info.dtype] != info.nbytes or numel == 0:
            return out.copy_(self.read(name).reshape(out.shape))
        try:
            with info.file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                with (
                    warnings.catch_warnings()
                ):  # read-only mapping: torch warns that the buffer is not writable
                    warnings.simplefilter("ignore", UserWarning)
                    src = torch.frombuffer(
                        mapped, dtype=dtype, count=numel, offset=info.data_start + info.offsets[0]
                    )
                try:
                    out.copy_(src.view(out.shape))
                finally:
                    del src  # the mapping cannot close while a tensor views it
        except (OSError, ValueError, RuntimeError) as exc:
            raise TunevecError(f"{info.file}: cannot read tensor {name!r}: {exc}") from exc
        return out

    def stream(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, grouped by shard so each file is opened once."""
        wanted = list(self.tensors) if names is None else list(names)
        for name in wanted:
            if name not in self.tensors:
                raise TunevecError(f"{self.path}: no tensor named {name!r}")
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for file, file_names in by_file.items():
            try:
                with safe_open(file, framework="pt") as f:
                    for name in file_names:
                        yield name, f.get_tensor(name)
            except TunevecError:
                raise
            except Exception as exc:
                raise TunevecError(f"{file}: cannot read tensors: {exc}") from exc

    def fingerprint(self) -> str:
        """A cheap content fingerprint of the weights: names, dtypes, shapes and sampled bytes of every tensor.

        Hashing every byte of a 7B checkpoint costs a full read; sampling 3 x 4 KiB per tensor (start, middle,
        end) still tells a base from its fine-tune, because fine-tuning changes nearly every element of the
        tensors it trains, while reading only kilobytes. The config is left out on purpose: re-saving the same
        weights with another transformers version must not change the fingerprint.
        """
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            info = self.tensors[name]
            h.update(f"{name}|{info.dtype}|{info.shape}".encode())
            h.update(_sample_bytes(info))
        return h.hexdigest()


def _sample_bytes(info: TensorInfo, chunk: int = 4096) -> bytes:
    begin = info.data_start + info.offsets[0]
    n = info.nbytes
    starts = sorted({0, max(0, n // 2 - chunk // 2), max(0, n - chunk)})
    out = bytearray()
    with info.file.open("rb") as f:
        for s in starts:
            f.seek(begin + s)
            out += f.read(min(chunk, n - s))
    return bytes(out)


def load_checkpoint_stream(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream every tensor of a checkpoint folder; shorthand for ``Checkpoint(path).stream()``."""
    return Checkpoint(path).stream()
