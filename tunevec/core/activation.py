"""Activation vectors: directions added to the residual stream of chosen decoder layers, per request.

Layout of an artifact folder (docs/artifact-format.md)::

    A/directions.safetensors   direction.{k}: float32 [hidden], one per steered layer
    A/activation.json          format, version, name, base (fingerprint when known, architecture, sizes),
                               layers, per-layer norms, where the directions came from, the file's sha256

``direction.{k}`` is added to the output of decoder layer ``k`` (0-based: transformers' ``model.layers[k]``), the
convention of repeng's and llama.cpp's control vectors, so ``from_gguf`` reads their files as they are: a
``controlvector`` GGUF holds one ``direction.{k}`` tensor per layer (llama.cpp never steers layer 0, the others
need nothing else). A request scales the whole vector by its alpha; a layer range in the spec keeps some layers.

Two sources make them: ``tunevec derive`` (the mean residual-stream shift a tuning vector causes on a probe set,
``analysis/derive.py``) and ``from_gguf``. The folder is staged and moved into place whole, like a tuning vector.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.files import StagedFolder

FORMAT = "tunevec.activation-vector"
VERSION = 1
MANIFEST_FILE = "activation.json"
TENSORS_FILE = "directions.safetensors"
DIRECTION = re.compile(r"^direction\.(\d+)$")


def hidden_size(base: Checkpoint) -> int | None:
    config = base.config.get("text_config", base.config)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def layer_prefix(base: Checkpoint) -> str:
    """The checkpoint's decoder-layer prefix (``model.layers.``, ``gpt_neox.layers.`` ...)."""
    for name in base.tensors:
        m = re.search(r"^(.*?\blayers\.)\d+\.", name)
        if m:
            return m.group(1)
    raise TunevecError(f"{base.path}: no decoder layers (`...layers.N.`) among its tensors")


def residual_name(prefix: str, layer: int) -> str:
    """The name the server gives a direction: a tensor of decoder layer ``layer`` (``model.layers.3.residual``...)."""
    return f"{prefix}{layer}.residual.direction"


class ActivationVector:
    """An activation-vector artifact on disk (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        mpath = self.path / MANIFEST_FILE
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise TunevecError(f"{self.path}: not an activation-vector artifact ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TunevecError(f"{mpath}: format is not {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise TunevecError(f"{mpath}: version {manifest.get('version')!r}, this tunevec reads {VERSION}")
        layers = manifest.get("layers")
        if not isinstance(manifest.get("name"), str) or not isinstance(layers, list) or not layers:
            raise TunevecError(f"{mpath}: needs a name and a non-empty list of layers")
        if not all(isinstance(k, int) and k >= 0 for k in layers):
            raise TunevecError(f"{mpath}: layers must be decoder-layer indices (integers >= 0), got {layers}")
        self.manifest = manifest

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def content_digest(self) -> str:
        return hashlib.sha256(f"{FORMAT}\0{VERSION}\0{self.manifest['sha256']}".encode()).hexdigest()

    def directions(self) -> dict[int, torch.Tensor]:
        """``{layer: direction}``, float32, checked against the recorded sha256 and the manifest's layers."""
        raw = (self.path / TENSORS_FILE).read_bytes()
        if hashlib.sha256(raw).hexdigest() != self.manifest.get("sha256"):
            raise TunevecError(f"{self.path / TENSORS_FILE} does not match the sha256 in {MANIFEST_FILE}")
        out = {}
        for name, tensor in load(raw).items():
            m = DIRECTION.match(name)
            if m is None or tensor.dim() != 1:
                raise TunevecError(f"{self.path}: unexpected tensor {name!r} {list(tensor.shape)}")
            out[int(m.group(1))] = tensor.float()
        if sorted(out) != sorted(self.layers):
            raise TunevecError(
                f"{self.path}: directions for layers {sorted(out)}, the manifest lists {self.layers}"
            )
        return out

    def check_base(self, base: Checkpoint) -> None:
        """Refuse a base these directions were not made for: its fingerprint when recorded, its sizes always."""
        recorded = self.manifest.get("base", {})
        want = recorded.get("fingerprint")
        if want is not None and want != base.fingerprint():
            raise TunevecError(
                f"activation vector {self.name!r} ({self.path}) was made for a different base (fingerprint "
                f"{str(want)[:12]}…) than {base.path}"
            )
        size = hidden_size(base)
        if recorded.get("hidden_size") not in (None, size):
            raise TunevecError(
                f"activation vector {self.name!r}: hidden size {recorded.get('hidden_size')}, base {base.path} has "
                f"{size}"
            )
        if base.num_layers is not None and max(self.layers) >= base.num_layers:
            raise TunevecError(
                f"activation vector {self.name!r} steers layer {max(self.layers)}; base {base.path} has "
                f"{base.num_layers} decoder layers"
            )

    def to_gguf(self, path: str | os.PathLike[str]) -> Path:
        """A ``controlvector`` GGUF of these directions, as llama.cpp and repeng read them."""
        import gguf

        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string(
            "controlvector.model_hint", str(self.manifest.get("base", {}).get("architecture", ""))
        )
        writer.add_uint32("controlvector.layer_count", len(self.layers))
        for layer, direction in sorted(self.directions().items()):
            writer.add_tensor(f"direction.{layer}", direction.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return Path(path)


def write_activation(
    out: str | os.PathLike[str],
    name: str,
    directions: dict[int, torch.Tensor],
    base: Checkpoint,
    source: dict[str, Any],
    *,
    replace: bool = False,
    fingerprint: bool = True,
) -> ActivationVector:
    """Write an activation-vector artifact for ``base`` (fingerprinted unless the directions came from elsewhere)."""
    size = hidden_size(base)
    for layer, direction in directions.items():
        if layer < 0 or (base.num_layers is not None and layer >= base.num_layers):
            raise TunevecError(
                f"direction for layer {layer}: base {base.path} has {base.num_layers} decoder layers"
            )
        if direction.dim() != 1 or (size is not None and direction.shape[0] != size):
            raise TunevecError(
                f"direction for layer {layer} has shape {list(direction.shape)}, base hidden size {size}"
            )
        if not torch.isfinite(direction).all():
            raise TunevecError(f"direction for layer {layer} is not finite")
    tensors = {f"direction.{k}": d.float().contiguous() for k, d in sorted(directions.items())}
    with StagedFolder(out, replace=replace) as tmp:
        save_file(tensors, tmp / TENSORS_FILE)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "base": {
                "fingerprint": base.fingerprint() if fingerprint else None,
                "architecture": base.architecture,
                "hidden_size": size,
                "num_layers": base.num_layers,
                "path": str(base.path),
            },
            "layers": sorted(directions),
            "norms": {str(k): float(d.float().norm()) for k, d in sorted(directions.items())},
            "source": source,
            "sha256": hashlib.sha256((tmp / TENSORS_FILE).read_bytes()).hexdigest(),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return ActivationVector(out)


def from_gguf(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    name: str,
    base: Checkpoint,
    *,
    replace: bool = False,
) -> ActivationVector:
    """Import a repeng / llama.cpp ``controlvector`` GGUF (``direction.{k}`` tensors) as an artifact for ``base``."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise TunevecError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch = reader.fields.get("general.architecture")
    if arch is not None and bytes(arch.parts[arch.data[0]]).decode() != "controlvector":
        raise TunevecError(f"{path}: general.architecture is not 'controlvector'")
    directions = {}
    for tensor in reader.tensors:
        m = DIRECTION.match(tensor.name)
        if m is None:
            continue
        directions[int(m.group(1))] = torch.from_numpy(tensor.data.astype("float32").reshape(-1).copy())
    if not directions:
        raise TunevecError(f"{path}: no direction.N tensors")
    hint = reader.fields.get("controlvector.model_hint")
    source = {
        "kind": "gguf",
        "file": Path(path).name,
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "model_hint": bytes(hint.parts[hint.data[0]]).decode() if hint is not None else None,
    }
    return write_activation(out, name, directions, base, source, replace=replace, fingerprint=False)
