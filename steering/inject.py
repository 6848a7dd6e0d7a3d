"""Exact, full-rank injection: theta = theta_base + delta(spec), applied to each tensor as it streams in.

One ``Injection`` serves three consumers, so they cannot drift apart:
- vLLM's model loader (``tunevec.steering.vllm_loader``), which yields injected tensors to the engine while it loads;
- ``tunevec merge``, which writes the injected model as a plain HF checkpoint;
- the PyTorch reference used by the tests (``tunevec.steering.reference``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tunevec.steering.delta import delta_for
from tunevec.steering.library import VectorLibrary
from tunevec.steering.spec import Spec

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.vector import TENSORS_FILE, SafetensorsWriter


class Injection:
    """A parsed spec bound to the vectors it names; ``apply`` adds the combined delta to one base tensor."""

    def __init__(self, spec: Spec, library: VectorLibrary):
        self.spec = spec
        self.library = library
        self._handles = {
            name: safe_open(library[name].path / TENSORS_FILE, framework="pt") for name in spec.vectors
        }
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

    def settings(self, base: str | None = None) -> dict:
        paths = self.library.paths()
        return {
            "spec": self.spec.canonical(),
            "vectors": {n: paths[n] for n in self.spec.vectors},
            "base": base,
        }

    def delta(self, name: str) -> torch.Tensor | None:
        wanted = {c.vector for c in self.spec.components if c.applies_to(name)}
        taus = {
            v: self._handles[v].get_tensor(name) for v in wanted if name in self.library[v].manifest.tensors
        }
        if not taus:
            return None
        return delta_for(self.spec, name, taus)

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        delta = self.delta(name)
        if delta is None:
            return tensor
        if delta.shape != tensor.shape:
            # An enlarged vocabulary in the *base* would land here; vectors only cover the base's own rows.
            raise TunevecError(
                f"{name}: delta shape {tuple(delta.shape)} does not match base {tuple(tensor.shape)}"
            )
        self.applied[name] = float(delta.norm())
        return (tensor.to(torch.float32) + delta.to(torch.float32)).to(tensor.dtype)

    def stream(self, base: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in base.stream():
            yield name, self.apply(name, tensor)


def merge_to_checkpoint(
    base_path: str | Path, injection: Injection, out: str | Path, *, force: bool = False
) -> Path:
    """Write base + delta(spec) as a plain HF folder (config, tokenizer files copied; one safetensors file)."""
    base = Checkpoint(base_path)
    out = Path(out)
    if out.exists() and not force:
        raise TunevecError(f"{out} already exists; pass --force to replace it")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in base.path.iterdir():
            if (
                f.is_file()
                and not f.name.endswith(".safetensors")
                and f.name != "model.safetensors.index.json"
            ):
                shutil.copy2(f, tmp / f.name)
        plan = [(n, _torch_dtype(i.dtype), i.shape) for n, i in base.tensors.items()]
        writer = SafetensorsWriter(
            tmp / "model.safetensors", plan, {"format": "pt", "tunevec_spec": injection.spec.canonical()}
        )
        for name, tensor in injection.stream(base):
            writer.write(name, tensor)
        writer.close()
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _torch_dtype(code: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code, torch.float32)
