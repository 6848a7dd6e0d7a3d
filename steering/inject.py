"""Exact, full-rank injection: theta = theta_base + delta(spec), applied to each tensor as it streams in.

One ``Injection`` serves both consumers, so they cannot drift apart:
- vLLM's model loader (``tunevec.steering.vllm_loader``), which yields injected tensors to the engine while it loads;
- ``tunevec merge`` (``merge_to_checkpoint``), which writes the injected model as a plain HF checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from tunevec.core.checkpoint import INDEX_FILE, Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.files import StagedFolder
from tunevec.core.vector import ST_DTYPES, SafetensorsWriter
from tunevec.steering.delta import delta_for
from tunevec.steering.library import VectorLibrary
from tunevec.steering.spec import Spec


class Injection:
    """A parsed spec bound to the vectors it names; ``apply`` adds the combined delta to one base tensor.

    Each vector's bytes are checked against its manifest before they are used (``TuningVector.open_tensors``).
    """

    def __init__(self, spec: Spec, library: VectorLibrary):
        self.spec = spec
        self.library = library
        self._handles = {name: library.weights(name).open_tensors() for name in spec.vectors}
        self.applied: dict[str, float] = {}  # tensor name -> ||delta||_F, for the load report

    @classmethod
    def from_settings(cls, settings: dict) -> Injection:
        """Build from the plain dict that travels to vLLM's engine processes: {"spec": str, "vectors": {name: path}}."""
        if not isinstance(settings, dict) or "spec" not in settings or "vectors" not in settings:
            raise TunevecError('tunevec loader settings must be {"spec": "...", "vectors": {name: path}}')
        base = Checkpoint(settings["base"]) if settings.get("base") else None
        spec = Spec.parse(settings["spec"])
        library = VectorLibrary.from_paths(settings["vectors"], base)
        spec.validate(library.names(), num_layers=base.num_layers if base else None)
        return cls(spec, library)

    def delta(self, name: str) -> torch.Tensor | None:
        wanted = {c.vector for c in self.spec.components if c.applies_to(name)}
        taus = {
            v: self._handles[v].get_tensor(name) for v in wanted if name in self.library[v].manifest.tensors
        }
        if not taus:
            return None
        return delta_for(self.spec, name, taus)

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """base + delta for one tensor, in the tensor's own dtype; tensors no component touches come back as they are.

        The sum is computed in float32, or float64 for a float64 base tensor, so a wide weight is not narrowed.
        """
        delta = self.delta(name)
        if delta is None:
            return tensor
        if not tensor.is_floating_point():
            raise TunevecError(
                f"{name}: the base tensor is {tensor.dtype}, not floating point; it cannot take a delta"
            )
        if delta.shape != tensor.shape:
            # An enlarged vocabulary in the *base* would land here; vectors only cover the base's own rows.
            raise TunevecError(
                f"{name}: delta shape {tuple(delta.shape)} does not match base {tuple(tensor.shape)}"
            )
        self.applied[name] = float(delta.norm())
        wide = torch.promote_types(tensor.dtype, torch.float32)
        return (tensor.to(wide) + delta.to(wide)).to(tensor.dtype)

    def stream(self, base: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in base.stream():
            yield name, self.apply(name, tensor)


def merge_to_checkpoint(
    base_path: str | Path, injection: Injection, out: str | Path, *, force: bool = False
) -> Path:
    """Write base + delta(spec) as a plain HF folder (config, tokenizer files copied; one safetensors file).

    Every tensor keeps the base's dtype; tensors that are not floating point (integer buffers, masks) are copied
    unchanged. The folder is staged beside ``out`` and moved into place whole (``tunevec.core.files``).
    """
    base = Checkpoint(base_path)
    out = Path(out)
    if out.exists() and not force:
        raise TunevecError(f"{out} already exists; pass --force to replace it")
    plan = []
    for name, info in base.tensors.items():
        dtype = ST_DTYPES.get(info.dtype)
        if dtype is None:
            raise TunevecError(
                f"{info.file}: tensor {name!r} has dtype {info.dtype}, which tunevec cannot write; "
                f"supported: {', '.join(ST_DTYPES)}"
            )
        plan.append((name, dtype, info.shape))
    with StagedFolder(out, replace=force) as tmp:
        for f in base.path.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_FILE:
                shutil.copy2(f, tmp / f.name)
        writer = SafetensorsWriter(
            tmp / "model.safetensors", plan, {"format": "pt", "tunevec_spec": injection.spec.canonical()}
        )
        for name, tensor in injection.stream(base):
            writer.write(name, tensor)
        writer.close()
    return out
