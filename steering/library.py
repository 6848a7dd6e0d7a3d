"""The vectors a server or a merge may use: a folder of tuning-vector artifacts, checked against one base."""

from __future__ import annotations

import os
from pathlib import Path

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.vector import MANIFEST_FILE, TuningVector
from tunevec.steering.spec import VECTOR_NAME


class VectorLibrary:
    """Named tuning vectors, each refused unless it was extracted from ``base``.

    A vectors folder holds one artifact per subfolder (``DIR/medical/manifest.json`` ...); the manifest's name is
    the name requests use. Checking every vector against the base up front means a vector built from another
    base is refused at start-up, with its path in the message, instead of silently producing a wrong model.
    """

    def __init__(self, vectors: dict[str, TuningVector], base: Checkpoint | None = None):
        for name in vectors:
            if not VECTOR_NAME.fullmatch(name):
                raise TunevecError(
                    f"vector name {name!r} cannot be used in a spec (letters, digits, _ . -, not starting with a "
                    "digit); re-extract it with `tunevec extract --name`"
                )
        self.vectors = vectors
        if base is not None:
            for vec in vectors.values():
                vec.check_base(base)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], base: Checkpoint | None = None) -> VectorLibrary:
        root = Path(path)
        if not root.is_dir():
            raise TunevecError(f"vectors folder {root} does not exist")
        found: dict[str, TuningVector] = {}
        for sub in sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).exists()):
            vec = TuningVector(sub)
            if vec.name in found:
                raise TunevecError(f"two vectors named {vec.name!r}: {found[vec.name].path} and {sub}")
            found[vec.name] = vec
        if not found:
            raise TunevecError(f"no tuning vectors in {root} (expected subfolders with {MANIFEST_FILE})")
        return cls(found, base)

    @classmethod
    def from_paths(cls, paths: dict[str, str], base: Checkpoint | None = None) -> VectorLibrary:
        return cls({name: TuningVector(p) for name, p in paths.items()}, base)

    def names(self) -> list[str]:
        return sorted(self.vectors)

    def __getitem__(self, name: str) -> TuningVector:
        try:
            return self.vectors[name]
        except KeyError:
            raise TunevecError(f"unknown vector {name!r}; known vectors: {', '.join(self.names())}") from None

    def paths(self) -> dict[str, str]:
        return {name: str(vec.path.resolve()) for name, vec in self.vectors.items()}
