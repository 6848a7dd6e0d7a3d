"""One model resident on the device; the other models of an analysis are streamed into it as weights or deltas.

A 7B pair in float32 is 54 GB; one model is 27 GB. The probe and attribution patching both compare a base with
models that differ from it by a tuning vector, so they keep only the base resident and stream each vector's
tensors into its parameters, one tensor at a time (θ ← θ + τ), then stream the base's own tensors back
(θ ← θ_base) for the names that changed. Nothing but one tensor in flight is held beside the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError


def load_model(path: str | os.PathLike[str], device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """The Hugging Face causal LM at ``path`` in ``dtype``, in eval mode, loaded straight onto ``device``."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type != "cpu":
        kwargs["device_map"] = str(device)  # shard by shard onto the device; no full copy on the host
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


class ResidentModel:
    """The base model on ``device``, into which a tuning vector (θ_base + τ) or a tuned checkpoint is streamed."""

    def __init__(self, base_path: str | os.PathLike[str], device: torch.device) -> None:
        self.base = Checkpoint(base_path)
        self.device = device
        self.model = load_model(base_path, device)
        self._targets = self.model.state_dict(
            keep_vars=True
        )  # names -> the live parameters (tied ones shared)
        self._changed: set[str] = set()

    def _target(self, name: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
        target = self._targets.get(name)
        if target is None or tuple(target.shape) != tuple(shape):
            raise TunevecError(
                f"{source}: tensor {name!r} {list(shape)} is not a parameter of the model loaded from {self.base.path}"
                f"{'' if target is None else f' (there it is {list(target.shape)})'}; it must be a fine-tune of "
                "this base, saved with the same tensor names"
            )
        return target

    @torch.no_grad()
    def add_vector(self, vector: Any) -> None:
        """θ ← θ_base + τ for every tensor of ``vector`` (a TuningVector), streamed one tensor at a time."""
        for name, tau in vector.stream():
            target = self._target(name, tuple(tau.shape), f"vector {vector.name!r}")
            target.data.add_(tau.to(self.device))
            self._changed.add(name)

    @torch.no_grad()
    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """θ ← θ_tuned: every tensor of the checkpoint at ``path`` copied into the resident model.

        The tuned model then runs under the base's config; one that needs other settings (rope, norms, windows) is
        refused, since it would not be the model that was tuned.
        """
        tuned = Checkpoint(path)
        if tuned.runtime_settings() != self.base.runtime_settings():
            raise TunevecError(
                f"tuned model {Path(path)} runs with other settings than the base {self.base.path} "
                "(rope, norms or attention, see `tunevec extract`'s config check); the probe streams the tuned "
                "weights into the base model, which would not be that model. Analyse base + tau instead (leave out "
                "--tuned)"
            )
        for name, info in tuned.tensors.items():
            target = self._target(name, info.shape, f"tuned model {Path(path)}")
            target.data.copy_(tuned.read(name).to(self.device))
            self._changed.add(name)

    @torch.no_grad()
    def restore(self) -> None:
        """Every changed tensor back to the base's (exact: read again from the base checkpoint)."""
        for name in sorted(self._changed):
            self._targets[name].data.copy_(self.base.read(name).to(self.device))
        self._changed.clear()

    def release(self) -> None:
        self.model = None
        self._targets = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
