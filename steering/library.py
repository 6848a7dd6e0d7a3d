"""The vectors a server or a merge may use: a folder of tuning-vector and activation-vector artifacts, checked
against one base."""

from __future__ import annotations

import os
from pathlib import Path

from tunevec.core.activation import MANIFEST_FILE as ACTIVATION_MANIFEST
from tunevec.core.activation import ActivationVector
from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.vector import MANIFEST_FILE, TuningVector
from tunevec.steering.spec import VECTOR_NAME

Vector = TuningVector | ActivationVector


class VectorLibrary:
    """Named vectors, each refused unless it was made for ``base``: tuning vectors (weights) and activation vectors
    (residual-stream directions, ``tunevec.core.activation``), one name space for both.

    A vectors folder holds one artifact per subfolder (``DIR/medical/manifest.json``, ``DIR/calm/activation.json``
    ...); the manifest's name is the name requests use. Checking every vector against the base up front means a
    vector built from another base is refused at start-up, with its path in the message, instead of silently
    producing a wrong model.
    """

    def __init__(self, vectors: dict[str, Vector], base: Checkpoint | None = None):
        for name in vectors:
            if not VECTOR_NAME.fullmatch(name):
                raise TunevecError(
                    f"vector name {name!r} cannot be used in a spec (letters, digits, _ . -, not starting with a "
                    "digit); re-extract it with `tunevec extract --name`"
                )
        self.vectors = vectors
        self.base = base
        if base is not None:
            for vec in vectors.values():
                vec.check_base(base)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], base: Checkpoint | None = None) -> VectorLibrary:
        root = Path(path)
        if not root.is_dir():
            raise TunevecError(f"vectors folder {root} does not exist")
        found: dict[str, Vector] = {}
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if (sub / MANIFEST_FILE).exists():
                vec: Vector = TuningVector(sub)
            elif (sub / ACTIVATION_MANIFEST).exists():
                vec = ActivationVector(sub)
            else:
                continue
            if vec.name in found:
                raise TunevecError(f"two vectors named {vec.name!r}: {found[vec.name].path} and {sub}")
            found[vec.name] = vec
        if not found:
            raise TunevecError(f"no tuning vectors in {root} (expected subfolders with {MANIFEST_FILE})")
        return cls(found, base)

    @classmethod
    def from_paths(cls, paths: dict[str, str], base: Checkpoint | None = None) -> VectorLibrary:
        return cls({name: open_vector(p) for name, p in paths.items()}, base)

    def names(self) -> list[str]:
        return sorted(self.vectors)

    def kind(self, name: str) -> str:
        """``"weights"`` (a tuning vector) or ``"activation"``."""
        return "activation" if isinstance(self[name], ActivationVector) else "weights"

    def weights(self, name: str) -> TuningVector:
        """The tuning vector ``name``; a clear error for an activation vector (it has no weights)."""
        vec = self[name]
        if isinstance(vec, ActivationVector):
            raise TunevecError(
                f"{name!r} is an activation vector: it steers the residual stream per request and has no weights to "
                "merge, inject or turn into an adapter"
            )
        return vec

    def __getitem__(self, name: str) -> Vector:
        try:
            return self.vectors[name]
        except KeyError:
            raise TunevecError(f"unknown vector {name!r}; known vectors: {', '.join(self.names())}") from None

    def paths(self) -> dict[str, str]:
        return {name: str(vec.path.resolve()) for name, vec in self.vectors.items()}


def open_vector(path: str | os.PathLike[str]) -> Vector:
    """The artifact in ``path``, of whichever kind."""
    return ActivationVector(path) if (Path(path) / ACTIVATION_MANIFEST).exists() else TuningVector(path)
