"""The one place that walks checkpoints: HF folders with single or sharded safetensors, named by path or hub id.

Analysis (extraction) and steering (injection, merge, adapters) both read tensors through ``Checkpoint``: it maps
tensor names to shards, validates the files up front (so a truncated shard fails before any work is done) and reads
one tensor at a time, so memory stays bounded by the largest tensor in flight. ``resolve_model`` turns what a user
typed (a folder, or a Hugging Face id with an optional revision) into the folder ``Checkpoint`` reads, through
huggingface_hub's own cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE are honoured).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
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
# Config keys naming a rope setting, by spelling -> the one name runtime_settings() uses.
_ROPE_KEYS = {
    "rope_theta": "rope_theta",
    "rotary_emb_base": "rope_theta",
    "partial_rotary_factor": "partial_rotary_factor",
    "rotary_pct": "partial_rotary_factor",
    "rotary_dim": "rotary_dim",
}
# Config keys other than rope that change what the same weights compute (activations, norm epsilons, attention
# windows and scales, logit caps, head layout, residual wiring). Token ids, dtypes, versions and limits such as
# max_position_embeddings are not among them.
_RUNTIME_KEYS = (
    "hidden_act",
    "hidden_activation",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "use_parallel_residual",
    "attention_multiplier",
    "embedding_multiplier",
    "residual_multiplier",
    "logits_scaling",
)


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

    def weight_dtypes(self) -> list[str]:
        """The safetensors dtype codes of the floating-point tensors, sorted (``["BF16"]`` for most models)."""
        return sorted({i.dtype for i in self.tensors.values() if i.dtype in ST_FLOAT_DTYPES})

    def runtime_settings(self) -> dict:
        """The config values under which the same weights compute a different function, in one comparable form.

        Rope settings are gathered into one ``rope`` mapping whatever the spelling: transformers 4 writes
        ``rope_theta`` and ``rope_scaling``, transformers 5 ``rope_parameters``, GPT-NeoX ``rotary_pct`` and
        ``rotary_emb_base``; defaults (``rope_type: default``, a rotary fraction of 1) are filled in so equal
        settings compare equal across versions. The other keys are taken as written, when present.
        """
        cfg = self.config
        rope: dict = {}
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(cfg.get(key), dict):
                rope.update(cfg[key])
        for key, alias in _ROPE_KEYS.items():
            if cfg.get(key) is not None:
                rope[alias] = cfg[key]
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        rope.setdefault("rope_type", "default")
        if rope.get("partial_rotary_factor") == 1.0:
            del rope["partial_rotary_factor"]
        out = {"rope": rope}
        out.update({k: cfg[k] for k in _RUNTIME_KEYS if k in cfg})
        return out

    def token_table(self) -> dict[int, tuple[str, bool]] | None:
        """Token id -> (token text, is special) from ``tokenizer.json``; None when there is none to read.

        Read as JSON (no tokenizer library): the model's vocabulary (a mapping for BPE/WordPiece/WordLevel, a list
        of (piece, score) for Unigram) plus ``added_tokens``, which override the ids they name.
        """
        path = self.path / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            vocab = data.get("model", {}).get("vocab")
            if isinstance(vocab, dict):
                table = {int(i): (str(tok), False) for tok, i in vocab.items()}
            elif isinstance(vocab, list):
                table = {i: (str(entry[0]), False) for i, entry in enumerate(vocab)}
            else:
                return None
            for added in data.get("added_tokens", []):
                table[int(added["id"])] = (str(added["content"]), bool(added.get("special", False)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise TunevecError(f"{path}: cannot read the tokenizer's vocabulary: {exc}") from exc
        return table

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


# What a hub snapshot needs for tunevec: weights as safetensors, configs, tokenizer files. Pickled .bin/.pt weights,
# GGUF and ONNX copies that many repos also carry are never downloaded.
HUB_FILES = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SMALL_FILE = 64 * 1024 * 1024  # files up to this size are hashed outright


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder on disk and, when it came from the Hugging Face hub, where from.

    ``hub_id`` is None for a local folder. ``revision`` is what was asked for (``None`` means the default branch),
    ``commit`` the snapshot actually read (the cache's folder name), so a manifest can say exactly which weights it
    was built from even when a branch moves later.
    """

    path: Path
    hub_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def describe(self) -> dict:
        """Provenance for a manifest: hub id, revision, commit and each file's size and sha256 (see files())."""
        return {
            "hub_id": self.hub_id,
            "revision": self.revision,
            "commit": self.commit,
            "files": self.files(),
        }

    def files(self) -> dict[str, dict]:
        """Size and sha256 of every file of the folder, as cheaply as they can be known for sure.

        A hub snapshot links each large file to a blob named by its sha256 (the hub's LFS object id, which
        huggingface_hub uses as the blob's name; it is taken as stored, not re-hashed), so weights cost nothing to
        identify. Small files (configs, tokenizers) are hashed outright. A large file without such a name (weights in a local folder) gets its size
        only and ``sha256: null``: hashing every byte of a 7B model would cost a full extra read; the checkpoint's
        sampled fingerprint identifies the weights instead (docs/artifact-format.md).
        """
        out: dict[str, dict] = {}
        for f in sorted(p for p in self.path.rglob("*") if p.is_file() and ".cache" not in p.parts):
            rel = f.relative_to(self.path).as_posix()
            size = f.stat().st_size
            blob = f.resolve().name if f.is_symlink() else ""
            if _SHA256.fullmatch(blob):
                digest: str | None = blob
            elif size <= _SMALL_FILE:
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
            else:
                digest = None
            out[rel] = {"size": size, "sha256": digest}
        return out


def resolve_model(ref: str | os.PathLike[str], revision: str | None = None) -> ResolvedModel:
    """A local model folder, or a Hugging Face hub id resolved to its snapshot folder in the hub cache.

    An existing folder always wins (as in transformers), so ``org/name`` on disk is read as a folder. Otherwise
    ``ref`` must be a hub id: the snapshot of ``revision`` (branch, tag or commit; default: the main branch) is
    taken from the cache, or downloaded into it unless HF_HUB_OFFLINE is set. Only safetensors weights, configs and
    tokenizer files are fetched (``HUB_FILES``).
    """
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision is not None:
            raise TunevecError(
                f"{text} is a local folder; a revision ({revision!r}) applies only to Hugging Face hub ids"
            )
        return ResolvedModel(path)
    if not _looks_like_hub_id(text):
        raise TunevecError(f"{text}: no such folder (and not a Hugging Face id like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache, offline = hub_cache_dir(), _hub_offline()
    try:
        folder = snapshot_download(
            text, revision=revision, cache_dir=cache, allow_patterns=HUB_FILES, local_files_only=offline
        )
    except LocalEntryNotFoundError as exc:
        where = f"revision {revision!r} of " if revision else ""
        raise TunevecError(
            f"{text}: not a local folder, and {where}this Hugging Face id is not in the hub cache {cache}"
            + (
                " (HF_HUB_OFFLINE is set, so nothing is downloaded); download it where the hub is reachable "
                f"(`hf download {text}`{f' --revision {revision}' if revision else ''}) or point HF_HOME / "
                "HF_HUB_CACHE at a cache that holds it"
                if offline
                else f": {exc}"
            )
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise TunevecError(f"{text}: cannot resolve on the Hugging Face hub: {exc}") from exc
    folder_path = Path(folder)
    return ResolvedModel(folder_path, hub_id=text, revision=revision, commit=folder_path.name)


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (its own constants are fixed at import)."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.path.expandvars(os.environ[key])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
