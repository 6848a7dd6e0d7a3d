"""The tuning-vector artifact: tau = theta_tuned - theta_base, tensor by tensor, with a versioned manifest.

Layout of an artifact folder (documented in docs/artifact-format.md)::

    V/vector.safetensors   tau for every floating-point tensor, HF tensor names, one dtype
    V/manifest.json        format, version, base/tuned fingerprints, per-tensor role, norms, sha256, policies

The folder is staged beside V and moved into place whole (``tunevec.core.files``), so an interrupted extraction
never leaves something that looks like a complete artifact. Opening an artifact checks every manifest field and
the safetensors header; the first read of its tensors checks their bytes against the manifest's sha256s, once per
version of the file (see ``TuningVector.ensure_verified``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import safe_open

from tunevec.core.checkpoint import ST_FLOAT_DTYPES, Checkpoint, TensorInfo, read_safetensors_header
from tunevec.core.errors import TunevecError
from tunevec.core.files import write_file_atomically
from tunevec.core.roles import ROLES

FORMAT = "tunevec.tuning-vector"
VERSION = 1
TENSORS_FILE = "vector.safetensors"
MANIFEST_FILE = "manifest.json"
# Written beside the artifact after its content was checked, so the next process need not re-read it all.
VERIFIED_FILE = ".tunevec-verified.json"

# Every safetensors dtype a checkpoint may hold: checkpoint.py's float table, plus the codes tunevec never computes
# on and only copies unchanged (integer buffers, masks, fp8 weights), so a merged checkpoint keeps them as they were.
ST_DTYPES: dict[str, torch.dtype] = {
    **ST_FLOAT_DTYPES,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_CODES = {dtype: code for code, dtype in ST_DTYPES.items()}
# The storage dtypes a tuning vector may have (``tunevec extract --dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_MANIFEST_LIMIT = 256 * 1024 * 1024  # a 7B model's manifest is about 100 KB; refuse to parse anything absurd
_READ_CHUNK = 16 * 1024 * 1024


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time.

    The header (names, dtypes, shapes, offsets) is known before any data is computed, so it is written first and
    tensors follow in plan order; memory never holds more than the tensor being written. The result is a plain
    safetensors file that the safetensors library reads and validates. Any dtype in ``ST_DTYPES`` can be written.
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
            code = _ST_CODES.get(dtype)
            if code is None:
                raise TunevecError(
                    f"{name}: cannot write dtype {dtype} to safetensors; supported: {sorted(ST_DTYPES)}"
                )
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
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

    def write(self, folder: Path) -> None:
        """Write ``folder/manifest.json`` (replacing it atomically and durably)."""
        write_file_atomically(folder / MANIFEST_FILE, json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, d: object, where: Path) -> Manifest:
        """Check every field's type and range; a malformed manifest raises TunevecError naming the file and field."""
        return _ManifestReader(where).manifest(d)


class _ManifestReader:
    """Reads a manifest's JSON field by field, so a damaged or hand-edited file fails with the field's name."""

    def __init__(self, where: Path):
        self.where = where

    def fail(self, path: str, want: str, got: object) -> NoReturn:
        raise TunevecError(
            f"{self.where}: malformed manifest: field {path} must be {want}, got {_show(got)}; "
            "re-extract the vector with `tunevec extract`"
        )

    def manifest(self, d: object) -> Manifest:
        if not isinstance(d, dict):
            raise TunevecError(
                f"{self.where}: malformed manifest: must be a JSON object, got {type(d).__name__}; "
                "re-extract the vector with `tunevec extract`"
            )
        if d.get("format") != FORMAT:
            raise TunevecError(f"{self.where}: not a tunevec tuning vector (format {_show(d.get('format'))})")
        if d.get("version") != VERSION or isinstance(d.get("version"), bool):
            raise TunevecError(
                f"{self.where}: tuning-vector format version {_show(d.get('version'))} is not supported (this "
                f"tunevec reads version {VERSION}); re-extract it with `tunevec extract`"
            )
        name = self.required(d, "name", "name")
        if not isinstance(name, str) or not name:
            self.fail("name", "a non-empty string", name)
        dtype = self.required(d, "dtype", "dtype")
        if dtype not in DTYPES:
            self.fail("dtype", f"one of {', '.join(DTYPES)}", dtype)
        base, tuned = (self.side(d, key) for key in ("base", "tuned"))
        tensors = self.required(d, "tensors", "tensors")
        if not isinstance(tensors, dict):
            self.fail("tensors", "an object of tensor name to entry", tensors)
        entries = {tname: self.entry(tname, entry) for tname, entry in tensors.items()}
        policies = d.get("policies", {})
        if not isinstance(policies, dict):
            self.fail("policies", "an object", policies)
        created = d.get("created", "")
        if not isinstance(created, str):
            self.fail("created", "a string (UTC timestamp)", created)
        return Manifest(name, dtype, base, tuned, entries, policies, created)

    def required(self, d: dict, key: str, path: str) -> object:
        if key not in d:
            raise TunevecError(
                f"{self.where}: malformed manifest: field {path} is missing; re-extract the vector with "
                "`tunevec extract`"
            )
        return d[key]

    def side(self, d: dict, key: str) -> dict:
        value = self.required(d, key, key)
        if not isinstance(value, dict):
            self.fail(key, "an object (path, fingerprint, architecture, ...)", value)
        fingerprint = value.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            self.fail(f"{key}.fingerprint", "a string", fingerprint)
        return value

    def entry(self, tname: str, e: object) -> TensorEntry:
        at = f"tensors[{_show(tname)}]"
        if not isinstance(e, dict):
            self.fail(at, "an object", e)
        for key in ("name", "shape", "role", "layer", "module", "norm", "base_norm", "sha256"):
            self.required(e, key, f"{at}.{key}")
        if e["name"] != tname:
            self.fail(f"{at}.name", f"the tensor's own name {_show(tname)}", e["name"])
        shape = e["shape"]
        if not isinstance(shape, list) or not all(_is_int(x) and x >= 0 for x in shape):
            self.fail(f"{at}.shape", "a list of non-negative integers", shape)
        if e["role"] not in ROLES:
            self.fail(f"{at}.role", f"one of {', '.join(ROLES)}", e["role"])
        layer = e["layer"]
        if layer is not None and not (_is_int(layer) and layer >= 0):
            self.fail(f"{at}.layer", "a non-negative integer or null", layer)
        if e["module"] is not None and not isinstance(e["module"], str):
            self.fail(f"{at}.module", "a string or null", e["module"])
        for key in ("norm", "base_norm"):
            value = e[key]
            if not _is_real(value) or not value >= 0:  # `not >=` also catches NaN
                self.fail(f"{at}.{key}", "a non-negative number", value)
        digest = e["sha256"]
        if (
            not isinstance(digest, str)
            or len(digest) != 64
            or not all(c in "0123456789abcdef" for c in digest)
        ):
            self.fail(f"{at}.sha256", "64 lowercase hex digits", digest)
        return TensorEntry(
            tname, list(shape), e["role"], layer, e["module"], float(e["norm"]), float(e["base_norm"]), digest
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)  # manifest values come from json.loads, so their repr is bounded by the file's size
    return text if len(text) <= limit else text[: limit - 3] + "..."


# (resolved path, device, inode, size, mtime_ns of vector.safetensors, sha256 of manifest.json) -> checked.
_VERIFIED: set[tuple] = set()


class TuningVector:
    """A tuning-vector artifact on disk, read tensor by tensor.

    Opening it reads and checks the manifest and the safetensors header (cheap). Its tensor bytes are checked
    against the manifest's sha256s before the first ``read``/``stream`` (``ensure_verified``).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        mpath = self.path / MANIFEST_FILE
        if not mpath.exists():
            raise TunevecError(
                f"{self.path}: no {MANIFEST_FILE}; not a tuning-vector artifact (or an interrupted extraction)"
            )
        raw = _read_manifest_bytes(mpath)
        self._manifest_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise TunevecError(f"{mpath}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except RecursionError as exc:
            raise TunevecError(f"{mpath}: invalid JSON: nested too deeply") from exc
        except ValueError as exc:  # JSONDecodeError, or an integer literal beyond Python's digit limit
            raise TunevecError(f"{mpath}: invalid JSON: {exc}") from exc
        self.manifest = Manifest.from_json(obj, mpath)
        self._header = self._read_header()

    def _read_header(self) -> dict[str, TensorInfo]:
        tpath = self.path / TENSORS_FILE
        try:
            header = read_safetensors_header(tpath)
        except TunevecError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
            raise TunevecError(
                f"{tpath}: malformed safetensors header ({type(exc).__name__}: {exc})"
            ) from exc
        if set(header) != set(self.manifest.tensors):
            raise TunevecError(f"{self.path}: {TENSORS_FILE} and {MANIFEST_FILE} list different tensors")
        want_code = _ST_CODES[DTYPES[self.manifest.dtype]]
        for name, info in header.items():
            if list(info.shape) != self.manifest.tensors[name].shape:
                raise TunevecError(
                    f"{self.path}: tensor {name!r} has shape {list(info.shape)} in {TENSORS_FILE} but the manifest "
                    f"says {self.manifest.tensors[name].shape}"
                )
            if info.dtype != want_code:
                raise TunevecError(
                    f"{self.path}: tensor {name!r} is stored as {info.dtype} in {TENSORS_FILE} but the manifest's "
                    f"dtype is {self.manifest.dtype} ({want_code})"
                )
        return header

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def content_digest(self) -> str:
        """sha256 (hex) of what the vector contains: dtype, and every tensor's name, shape and byte checksum.

        Cheap (read from the manifest, not the tensors) and, once ``ensure_verified`` has passed, a faithful
        identity of the bytes: a re-extracted vector gets a new digest, a copied or renamed folder keeps it.
        """
        h = hashlib.sha256(f"{FORMAT}\0{VERSION}\0{self.manifest.dtype}\n".encode())
        for name in sorted(self.manifest.tensors):
            entry = self.manifest.tensors[name]
            h.update(f"{name}\0{entry.shape}\0{entry.sha256}\n".encode())
        return h.hexdigest()

    def names(self) -> list[str]:
        return list(self.manifest.tensors)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.manifest.tensors:
            raise TunevecError(f"{self.path}: vector has no tensor {name!r}")
        with self.open_tensors() as f:
            return f.get_tensor(name)

    def stream(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = self.names() if names is None else list(names)
        with self.open_tensors() as f:
            for name in wanted:
                yield name, f.get_tensor(name)

    def open_tensors(self):  # -> safetensors' safe_open handle (its type is not importable)
        """A ``safe_open`` handle on vector.safetensors whose bytes match the manifest (``ensure_verified``).

        The file's version is checked again once it is open, so a replacement that lands between the check and
        the open is refused instead of read unchecked. Usable directly or as a context manager.
        """
        self.ensure_verified()
        handle = safe_open(self.path / TENSORS_FILE, framework="pt")
        if self._version_key() not in _VERIFIED:
            raise TunevecError(
                f"{self.path / TENSORS_FILE} was replaced while it was being opened; open the vector again"
            )
        return handle

    # --- content verification ---------------------------------------------------------------------------------

    def _version_key(self) -> tuple:
        """What identifies this version of the artifact's bytes without reading them."""
        st = (self.path / TENSORS_FILE).stat()
        return (
            str(self.path.resolve()),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            self._manifest_sha256,
        )

    def ensure_verified(self) -> None:
        """Check the tensor bytes against the manifest unless this version of the file was already checked.

        "Already checked" means: in this process, or by any process that could write ``VERIFIED_FILE`` beside the
        artifact, for the same (device, inode, size, mtime_ns) of vector.safetensors and the same manifest bytes.
        Replacing or rewriting the file changes that key, so changed bytes are caught; a change that keeps size
        and mtime (``touch -d`` after editing, or silent disk corruption) is not, which is what ``verify()`` is for.
        """
        key = self._version_key()
        if key in _VERIFIED:
            return
        if self._stamp() == _stamp_json(key):
            _VERIFIED.add(key)
            return
        self.verify()

    def verify(self) -> None:
        """Read every tensor's bytes and check their sha256 against the manifest; TunevecError on any mismatch.

        On success the version is remembered for this process and, where the folder is writable, in
        ``VERIFIED_FILE`` for later ones.
        """
        before = self._version_key()
        tpath = self.path / TENSORS_FILE
        try:
            with tpath.open("rb") as f:
                for info in sorted(self._header.values(), key=lambda i: i.offsets[0]):
                    if _hash_range(f, info) != self.manifest.tensors[info.name].sha256:
                        raise TunevecError(
                            f"{tpath}: checksum mismatch for tensor {info.name!r}: its bytes are not the ones the "
                            "manifest records; the artifact is corrupt or was modified, re-extract it"
                        )
        except OSError as exc:
            raise TunevecError(f"{tpath}: cannot read tensors to verify them: {exc}") from exc
        if self._version_key() != before:
            raise TunevecError(f"{tpath}: the file changed while it was being verified; try again")
        _VERIFIED.add(before)
        with contextlib.suppress(OSError):  # a read-only vectors folder: verified per process only
            write_file_atomically(self.path / VERIFIED_FILE, json.dumps(_stamp_json(before)))

    def _stamp(self) -> object:
        try:
            return json.loads((self.path / VERIFIED_FILE).read_text())
        except (OSError, ValueError):
            return None

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


def _stamp_json(key: tuple) -> dict:
    _, device, inode, size, mtime_ns, manifest_sha256 = key
    return {
        "format": "tunevec.verified",
        "tensors_file": {"device": device, "inode": inode, "size": size, "mtime_ns": mtime_ns},
        "manifest_sha256": manifest_sha256,
    }


def _hash_range(f, info: TensorInfo) -> str:
    """sha256 of one tensor's bytes, read from the file in chunks (no tensor is built)."""
    h = hashlib.sha256()
    f.seek(info.data_start + info.offsets[0])
    left = info.nbytes
    while left > 0:
        chunk = f.read(min(left, _READ_CHUNK))
        if not chunk:
            raise OSError(f"file ends inside tensor {info.name!r}")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _read_manifest_bytes(mpath: Path) -> bytes:
    try:
        size = mpath.stat().st_size
        if size > _MANIFEST_LIMIT:
            raise TunevecError(f"{mpath}: {size} bytes is too large for a manifest; not a tunevec artifact")
        return mpath.read_bytes()
    except OSError as exc:
        raise TunevecError(f"{mpath}: cannot read the manifest: {exc}") from exc
