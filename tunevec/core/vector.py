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
import math
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from tunevec.core.checkpoint import ST_FLOAT_DTYPES, Checkpoint, read_safetensors_header
from tunevec.core.errors import TunevecError
from tunevec.core.roles import classify

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


def plan_extraction(base: Checkpoint, tuned: Checkpoint) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    """Decide which tensors tau covers and how mismatches are handled, before any tensor is read.

    Returns the (name, shape) plan and the policies report. Raises on mismatches that have no safe policy.
    """
    if base.architecture != tuned.architecture:
        raise TunevecError(
            f"architectures differ: base {base.path} is {base.architecture}, tuned {tuned.path} is "
            f"{tuned.architecture}; a tuning vector needs a fine-tune of the same model"
        )
    b, t = set(base.tensors), set(tuned.tensors)
    policies: dict = {"tied_embeddings": base.tie_word_embeddings, "vocab_extension": [], "skipped": []}
    # A tied head is the embedding; a checkpoint that stores both copies gets one tau, on the embedding.
    for ckpt in (base, tuned):
        if ckpt.tie_word_embeddings and "lm_head.weight" in ckpt.tensors:
            (b if ckpt is base else t).discard("lm_head.weight")
    if base.tie_word_embeddings != tuned.tie_word_embeddings:
        raise TunevecError(
            f"tied embeddings differ: base tie_word_embeddings={base.tie_word_embeddings}, tuned "
            f"{tuned.tie_word_embeddings}; tau of an untied head against a tied one is not defined"
        )
    if b != t:
        only_b, only_t = sorted(b - t), sorted(t - b)
        raise TunevecError(
            f"tensor names differ ({len(only_b)} only in base, e.g. {only_b[:3]}; {len(only_t)} only in tuned, "
            f"e.g. {only_t[:3]}); both checkpoints must come from the same architecture"
        )
    plan: list[tuple[str, tuple[int, ...]]] = []
    for name in base.names():
        if name not in b:
            continue
        bi, ti = base.tensors[name], tuned.tensors[name]
        if not (bi.dtype in ST_FLOAT_DTYPES and ti.dtype in ST_FLOAT_DTYPES):
            policies["skipped"].append({"tensor": name, "reason": f"non-float dtype {bi.dtype}"})
            continue
        if bi.shape == ti.shape:
            plan.append((name, bi.shape))
            continue
        role = classify(name).role
        grown = (
            role in ("embedding", "head")
            and len(bi.shape) == 2
            and bi.shape[1] == ti.shape[1]
            and ti.shape[0] > bi.shape[0]
        )
        if not grown:
            raise TunevecError(f"shape mismatch for {name!r}: base {bi.shape}, tuned {ti.shape}")
        policies["vocab_extension"].append(
            {
                "tensor": name,
                "base_rows": bi.shape[0],
                "tuned_rows": ti.shape[0],
                "added_rows": ti.shape[0] - bi.shape[0],
            }
        )
        plan.append((name, bi.shape))
    return plan, policies


def extract(
    base_path: str | os.PathLike[str],
    tuned_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> TuningVector:
    """Stream tau = tuned - base into an artifact at ``out``; at most one tensor pair is in memory at a time.

    The shared rows of an enlarged vocabulary are kept (tau covers the base's rows) and the added rows are
    reported in ``policies.vocab_extension`` with their norm.

    ``dtype="auto"`` stores tau in the checkpoints' own float dtype (float32 when they differ). tau is always
    computed in float32; the difference of two bf16 numbers within a factor 2 of each other is exact in bf16
    (Sterbenz), so storing it narrow rarely rounds, and where it does the manifest says how much
    (``policies.rounding``). Half the bytes to hash and write as a float32 tau of a bf16 model.
    """
    from tqdm import tqdm

    if dtype != "auto" and dtype not in DTYPES:
        raise TunevecError(f"dtype {dtype!r} not supported; choose auto or one of {sorted(DTYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise TunevecError(f"{out} already exists; pass --force to replace it")
    base, tuned = Checkpoint(base_path), Checkpoint(tuned_path)
    plan, policies = plan_extraction(base, tuned)
    if dtype == "auto":
        dtype = _common_dtype(base, tuned, [n for n, _ in plan])
    vname = name or tuned.path.name
    torch_dtype = DTYPES[dtype]
    t0 = time.perf_counter()

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = SafetensorsWriter(
            tmp / TENSORS_FILE, [(n, torch_dtype, s) for n, s in plan], {"format": FORMAT, "name": vname}
        )
        grown = {v["tensor"]: v for v in policies["vocab_extension"]}
        entries: dict[str, TensorEntry] = {}
        total = sum(base.tensors[n].nbytes + tuned.tensors[n].nbytes for n, _ in plan)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {vname}", disable=not progress)
        # Hashing and writing tensor i (hashlib and file writes release the GIL) overlaps reading and subtracting
        # tensor i+1; at most one tensor waits for the writer, so memory stays bounded.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunevec-writer") as pool:
            pending: tuple[str, Future] | None = None
            buffers = _Buffers()
            rounding = _Rounding()
            for i, (name_, shape) in enumerate(plan):
                w_base = base.read_into(name_, buffers.get("base", torch.float32, shape))
                # tau is computed in place in the tuned buffer; when it is also what gets written, two buffers
                # take turns, since the writer may still hold the previous tensor's.
                slot = f"tuned{i % 2}" if torch_dtype == torch.float32 else "tuned"
                w_tuned = tuned.read_into(name_, buffers.get(slot, torch.float32, tuned.tensors[name_].shape))
                if name_ in grown:
                    added = w_tuned[shape[0] :]
                    grown[name_]["added_rows_norm"] = float(added.norm())
                    w_tuned = w_tuned[: shape[0]]
                tau = w_tuned.sub_(w_base)
                role = classify(name_)
                entries[name_] = TensorEntry(
                    name=name_,
                    shape=list(shape),
                    role=role.role,
                    layer=role.layer,
                    module=role.module,
                    norm=float(tau.norm()),
                    base_norm=float(w_base.norm()),
                    sha256="",
                )
                if torch_dtype == torch.float32:
                    stored = tau
                else:
                    stored = buffers.get(f"out{i % 2}", torch_dtype, shape).copy_(tau)
                    rounding.add(stored, tau, entries[name_].norm, scratch=w_base)
                del w_base, w_tuned, tau
                if pending is not None:
                    entries[pending[0]].sha256 = pending[1].result()
                pending = (name_, pool.submit(writer.write, name_, stored))
                del stored
                bar.update(base.tensors[name_].nbytes + tuned.tensors[name_].nbytes)
            if pending is not None:
                entries[pending[0]].sha256 = pending[1].result()
        bar.close()
        writer.close()
        if torch_dtype != torch.float32:
            policies["rounding"] = rounding.report(dtype)
        manifest = Manifest(
            name=vname,
            dtype=dtype,
            base=_describe(base),
            tuned=_describe(tuned),
            tensors=entries,
            policies=policies,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        manifest.policies["extract_seconds"] = round(time.perf_counter() - t0, 3)
        _write_json_durably(tmp / MANIFEST_FILE, manifest.to_json())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TuningVector(out)


def _common_dtype(base: Checkpoint, tuned: Checkpoint, names: list[str]) -> str:
    """The one storage dtype of every planned tensor on both sides, if tau can be stored in it; else float32."""
    codes = {c.tensors[n].dtype for c in (base, tuned) for n in names}
    names_by_dtype = {t: name for name, t in DTYPES.items()}
    only = ST_FLOAT_DTYPES.get(codes.pop()) if len(codes) == 1 else None
    return names_by_dtype.get(only, "float32")


class _Rounding:
    """How far storing tau in a narrower dtype moved it from the float32 difference, summed over tensors."""

    def __init__(self) -> None:
        self.tensors = self.entries = self.total = 0
        self.max_abs = self.err_sq = self.tau_sq = 0.0

    def add(self, stored: torch.Tensor, tau: torch.Tensor, tau_norm: float, scratch: torch.Tensor) -> None:
        err = scratch.copy_(stored).sub_(tau)  # scratch: a float32 buffer of tau's shape that is free now
        moved = int(torch.count_nonzero(err))
        self.total += tau.numel()
        self.tau_sq += tau_norm**2
        if moved:
            self.tensors += 1
            self.entries += moved
            self.max_abs = max(self.max_abs, float(err.abs_().max()))
            self.err_sq += float(err.norm()) ** 2

    def report(self, dtype: str) -> dict:
        return {
            "dtype": dtype,
            "tensors_rounded": self.tensors,
            "entries_rounded": self.entries,
            "entries": self.total,
            "max_abs_error": self.max_abs,
            "relative_error": (self.err_sq / self.tau_sq) ** 0.5 if self.tau_sq else 0.0,
        }


class _Buffers:
    """Flat buffers reused across tensors, grown to the largest seen: allocating fresh multi-GB tensors for every
    tensor pair made the kernel's page faulting the largest single cost of extraction (bench/bench_extract.py)."""

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, key: str, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._flat.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._flat.pop(key, None)  # free the old one before allocating its replacement
            buf = self._flat[key] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(tuple(shape))


def _describe(ckpt: Checkpoint) -> dict:
    return {
        "path": str(ckpt.path.resolve()),
        "fingerprint": ckpt.fingerprint(),
        "architecture": ckpt.architecture,
        "num_layers": ckpt.num_layers,
        "num_tensors": len(ckpt.tensors),
    }


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
