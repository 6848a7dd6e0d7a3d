"""Per-request mixtures: a spec becomes a ``LoRARequest`` that names it; nothing is written or built here.

What a mixture is, end to end (docs/serving.md):
- the server factorises each vector once at start (``steering.lora.factor_cache``) and announces one snapshot of
  them (factor folders, content digests, ranks, what adapters leave out) to vLLM's workers and to its own API
  server (``tunevec.steering.vllm.write_snapshot``), so both sides serve the same factors;
- a request's spec is parsed and checked here (vectors, limits, rank, the share of each vector an adapter cannot
  carry), and named: the served name is the spec's canonical text, the adapter id a hash of that text, the
  vectors' content digests and the factorisation settings, so an id always means the same weights and a
  re-extracted vector gets new ids;
- the ``LoRARequest``'s path is ``tunevec-mixture:<canonical spec>``: vLLM's worker composes the adapter from the
  resident factors in memory (``tunevec.steering.vllm``).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tunevec.core.activation import ActivationVector, layer_prefix, residual_name
from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.core.roles import classify
from tunevec.core.vector import TuningVector
from tunevec.server.config import LoraSettings
from tunevec.steering.library import VectorLibrary
from tunevec.steering.lora import LoraAdapter, factor_cache, read_meta
from tunevec.steering.spec import Component, Spec, format_number
from tunevec.steering.vllm import mixture_request

# How many adapter ids are remembered to detect a 31-bit collision: more than vLLM can hold at once
# (--max-cpu-loras), so an id still loaded in the engine is always among them.
ID_MEMORY = 4096


@dataclass(frozen=True)
class VectorFactors:
    """What the server knows of one vector's factors: where they are, their content, ranks, what they leave out."""

    name: str
    digest: str
    path: str
    module_ranks: dict[str, int]
    # tensor name -> (||tau||^2, carried by an adapter); zero tensors count as carried (nothing to carry).
    energy: dict[str, tuple[float, bool]]
    dropped: dict[str, float]  # kind -> share of ||tau||^2
    deltas: tuple[str, ...] = ()  # tensors kept whole (norms, biases), applied per request as they are
    kind: str = "weights"  # or "activation": residual-stream directions, named as decoder-layer tensors
    prefix: str = ""  # activation vectors: the base's decoder-layer prefix their direction names use

    @classmethod
    def prepare(
        cls,
        vec: TuningVector | ActivationVector,
        cache_dir: str,
        settings: LoraSettings,
        base: Checkpoint | None,
    ) -> VectorFactors:
        if isinstance(vec, ActivationVector):
            return cls.of_activation(vec, base)
        path = factor_cache(vec, cache_dir, **settings.factorise_kwargs())
        meta = read_meta(path)
        ranks = {k: int(v) for k, v in meta.get("module_ranks", {}).items()}
        deltas = tuple(meta.get("deltas", ()))
        energy = {
            n: (e.norm**2, n in ranks or n in deltas or e.norm == 0) for n, e in vec.manifest.tensors.items()
        }
        return cls(
            vec.name, vec.content_digest, str(path), ranks, energy, dict(meta.get("dropped", {})), deltas
        )

    @classmethod
    def of_activation(cls, vec: ActivationVector, base: Checkpoint | None) -> VectorFactors:
        """An activation vector as the server serves it: each layer's direction a whole delta, named as a tensor of
        that decoder layer (so a spec's layer range selects directions), read by the workers from the artifact."""
        if base is None:
            raise TunevecError(f"activation vector {vec.name!r}: serving it needs the base (its layer names)")
        prefix = layer_prefix(base)
        norms = vec.manifest.get("norms", {})
        names = {residual_name(prefix, k): float(norms.get(str(k), 1.0)) for k in vec.layers}
        energy = {n: (norm**2, True) for n, norm in names.items()}
        return cls(
            vec.name, vec.content_digest, str(vec.path), {}, energy, {}, tuple(names), "activation", prefix
        )

    @property
    def carried(self) -> list[str]:
        """The tensors an adapter slot carries: factorised modules and whole deltas."""
        return [*self.module_ranks, *self.deltas]

    def to_json(self) -> dict[str, Any]:
        """This vector's entry in the server's snapshot (``tunevec.steering.vllm.write_snapshot``): the workers
        read ``path`` and ``digest``, the API server all of it."""
        return {
            "name": self.name,
            "digest": self.digest,
            "path": self.path,
            "module_ranks": self.module_ranks,
            "energy": {n: [e, ok] for n, (e, ok) in self.energy.items()},
            "dropped": self.dropped,
            "deltas": list(self.deltas),
            "kind": self.kind,
            "prefix": self.prefix,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VectorFactors:
        energy = {n: (float(e), bool(ok)) for n, (e, ok) in data["energy"].items()}
        return cls(
            data["name"],
            data["digest"],
            data["path"],
            dict(data["module_ranks"]),
            energy,
            dict(data["dropped"]),
            tuple(data.get("deltas", ())),
            data.get("kind", "weights"),
            data.get("prefix", ""),
        )

    def restricted_to(self, carried: set[str]) -> VectorFactors:
        """These factors as the engine serves them: tensors outside ``carried`` count as left out (kind
        ``module``)."""
        lost = [n for n in self.carried if n not in carried]
        if not lost:
            return self
        energy = {n: (e, ok and n not in lost) for n, (e, ok) in self.energy.items()}
        total = sum(e for e, _ in energy.values())
        dropped = dict(self.dropped)
        lost_energy = sum(self.energy[n][0] for n in lost if n in self.energy)
        dropped["module"] = dropped.get("module", 0.0) + (lost_energy / total if total else 0.0)
        ranks = {n: r for n, r in self.module_ranks.items() if n not in lost}
        deltas = tuple(n for n in self.deltas if n not in lost)
        return VectorFactors(
            self.name, self.digest, self.path, ranks, energy, dropped, deltas, self.kind, self.prefix
        )

    def intact(self) -> bool:
        """Whether the factor folder on disk still holds these factors, readable and of this content."""
        try:
            if self.kind == "activation":
                vec = ActivationVector(self.path)
                vec.directions()
                return vec.content_digest == self.digest
            return LoraAdapter.load(self.path).meta.get("content_digest") == self.digest
        except TunevecError:
            return False


@dataclass(frozen=True)
class Mixture:
    spec: Spec
    name: str  # the model name vLLM serves it under
    request: Any  # the LoRARequest that names it to the engine
    rank: int  # largest per-module rank
    truncated: bool  # some module's summed rank was above --max-lora-rank and is re-truncated by SVD
    left_out: dict[
        str, float
    ]  # component -> share of its part of tau no adapter carries (only those above 0)


def served_name(spec: Spec) -> str:
    """The canonical text, with ``:1`` written out when it is a bare vector name.

    vLLM applies a registered LoRA to chat requests whose content-part types (``text``, ``image`` ...) equal its
    name; a served name always has a ``:``, ``@``, ``[``, ``+`` or ``/``, so it can never be taken for one.
    """
    text = spec.canonical()
    return text if any(c in text for c in ":@[+/") else f"{text}:1"


def adapter_id(name: str, digests: Iterable[tuple[str, str]], settings: LoraSettings) -> int:
    """vLLM's ``lora_int_id`` for a mixture: 31 bits of a sha256 over its served name, each vector's name and
    content digest, and the factorisation settings (an id always means the same weights).

    Public so that a test can search for two specs whose ids collide (tests/test_hardening.py).
    """
    h = hashlib.sha256(name.encode())
    for vector, digest in digests:
        h.update(b"\0" + vector.encode() + b"\0" + digest.encode())
    h.update(b"\0" + f"{settings.factorise_kwargs()}".encode())
    return int.from_bytes(h.digest()[:8], "big") % (2**31 - 1) + 1


@dataclass
class _Ids:
    """Recently issued adapter ids and the mixture each stands for, to refuse a 31-bit collision."""

    keep: int = ID_MEMORY
    lock: threading.Lock = field(default_factory=threading.Lock)
    names: OrderedDict[int, str] = field(default_factory=OrderedDict)

    def claim(self, lora_id: int, name: str) -> None:
        with self.lock:
            other = self.names.get(lora_id)
            if other is not None and other != name:
                raise TunevecError(
                    f"adapter id collision between {other!r} and {name!r} (1 in 2^31); serve one of them under "
                    "a named variant with a slightly different coefficient"
                )
            self.names[lora_id] = name
            self.names.move_to_end(lora_id)
            while len(self.names) > self.keep:
                self.names.popitem(last=False)


class MixtureRegistry:
    """Parses, checks and names mixtures of the server's vectors. Holds no weights."""

    def __init__(
        self,
        settings: LoraSettings,
        vectors: dict[str, VectorFactors],
        num_layers: int | None,
        library: VectorLibrary | None = None,
        cache_dir: str = "",
    ):
        self.settings = settings
        self.vectors = vectors
        self.num_layers = num_layers
        self.library = library
        self.cache_dir = cache_dir
        # Every id vLLM may still hold (registered names, its adapter LRU) must stay remembered: keep well over
        # both, whatever --cache-capacity says.
        self._ids = _Ids(keep=max(ID_MEMORY, 4 * (settings.cache_capacity + settings.max_loras)))
        # Why the engine cannot serve any mixture, or any with an output-head delta (None: it can); from the
        # workers' own account of which of tunevec's patches took (restrict_to_engine).
        self.unservable: str | None = None
        self.no_head_delta: str | None = None

    @classmethod
    def prepare(cls, library: VectorLibrary, cache_dir: str, settings: LoraSettings, num_layers: int | None):
        """Factorise every vector of ``library`` (cached) and make the registry over them."""
        vectors = {
            n: VectorFactors.prepare(library[n], cache_dir, settings, library.base) for n in library.names()
        }
        return cls(settings, vectors, num_layers, library, cache_dir)

    @classmethod
    def from_snapshot(
        cls,
        snapshot: dict[str, dict[str, Any]],
        settings: LoraSettings,
        num_layers: int | None,
        library: VectorLibrary | None = None,
        cache_dir: str = "",
    ) -> MixtureRegistry:
        """The registry over exactly the factors ``tunevec serve`` announced to the workers (no vector is read
        again: a vector re-extracted while the engine started cannot put the two sides out of step)."""
        vectors = {n: VectorFactors.from_json(entry) for n, entry in snapshot.items()}
        return cls(settings, vectors, num_layers, library, cache_dir)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {n: f.to_json() for n, f in self.vectors.items()}

    def restrict_to_engine(self, carried: set[str], capabilities: list[dict[str, Any]] | None = None) -> None:
        """Count as left out every factorised module the engine's LoRA layers do not receive (vLLM would drop it),
        and take in what the workers said they can serve exactly (``tunevec_capabilities``, one answer a rank)."""
        self.vectors = {n: f.restricted_to(carried) for n, f in self.vectors.items()}
        for answer in capabilities or ():
            self.unservable = self.unservable or answer.get("mixtures")
            self.no_head_delta = self.no_head_delta or answer.get("head_delta")

    def factor_modules(self) -> list[str]:
        """Every tensor some vector's adapter carries (factorised modules and whole deltas)."""
        return sorted({m for f in self.vectors.values() for m in f.carried})

    def repair(self, names: tuple[str, ...]) -> bool:
        """Rebuild the factor folders of ``names`` that were deleted or damaged since start-up; True if any was.

        The folder path and content are fixed by the vector's digest and the settings, so the workers read the
        rebuilt folder exactly where they were told to. A vector artifact itself damaged, or changed, since
        start-up cannot give the announced factors again: a ``TunevecError`` says so.
        """
        rebuilt = False
        for name in names:
            factors = self.vectors[name]
            if not factors.intact():
                if factors.kind == "activation":
                    raise TunevecError(
                        f"activation vector {name!r} is damaged on disk; derive or import it again"
                    )
                vec = self.library[name]
                if vec.content_digest != factors.digest:
                    raise TunevecError(
                        f"vector {name!r} changed on disk since the server started (content {vec.content_digest[:12]}, "
                        f"served {factors.digest[:12]}); restart the server to serve the new one"
                    )
                factor_cache(vec, self.cache_dir, **self.settings.factorise_kwargs(), rebuild=True)
                rebuilt = True
        return rebuilt

    def parse(self, text_or_json: str | dict) -> Spec:
        """Parse a request's spec and check it against the server; raises TunevecError naming the problem."""
        spec = Spec.parse(text_or_json) if isinstance(text_or_json, str) else Spec.from_json(text_or_json)
        spec.validate(
            list(self.vectors),
            max_components=self.settings.max_components,
            max_abs_alpha=self.settings.max_abs_alpha,
            num_layers=self.num_layers,
        )
        for comp in spec.components:
            if self.vectors[comp.vector].kind == "activation" and comp.scope != "all":
                raise TunevecError(
                    f"{str(comp)!r}: {comp.vector!r} is an activation vector (residual-stream directions, one per "
                    f"layer); it takes a layer range such as {comp.vector}[10:14], not a scope like @{comp.scope}"
                )
        return spec

    def dropped_share(self, comp: Component) -> float:
        """The share of the component's part of its vector (its scope and layers) that no adapter carries."""
        total = left = 0.0
        for name, (e, is_carried) in self.vectors[comp.vector].energy.items():
            if comp.applies_to(name):
                total += e
                if not is_carried:
                    left += e
        return left / total if total > 0 else 0.0

    def module_ranks(self, spec: Spec) -> dict[str, int]:
        """Per module, the summed rank of the components that apply to it (what an exact mixture needs)."""
        ranks: dict[str, int] = {}
        for comp in spec.components:
            if comp.alpha == 0:
                continue
            for name, r in self.vectors[comp.vector].module_ranks.items():
                if comp.applies_to(name):
                    ranks[name] = ranks.get(name, 0) + r
        return ranks

    def mixture(self, spec: Spec) -> Mixture:
        """The mixture for a checked spec, or TunevecError if the server cannot serve it faithfully."""
        if spec.method != "linear":
            raise TunevecError(
                f"per-request mixtures are exact only for linear merges; {spec.method!r} needs full-rank injection "
                "(`tunevec serve --inject SPEC` or `tunevec merge`)"
            )
        if self.unservable:
            raise TunevecError(f"{self.unservable}; serve the variant with `tunevec serve --inject SPEC`")
        if self.no_head_delta:
            for comp in spec.components:
                head = [n for n in self.vectors[comp.vector].module_ranks if classify(n).role == "head"]
                if comp.alpha != 0 and any(comp.applies_to(n) for n in head):
                    raise TunevecError(
                        f"{str(comp)!r} changes the output head, and {self.no_head_delta}; restrict it to a scope "
                        "without the head (e.g. @attention, @mlp) or use --inject"
                    )
        limit = self.settings.max_dropped_share
        left_out = {}
        for comp in spec.components:
            share = self.dropped_share(comp)
            if share > 0:
                left_out[str(comp)] = share
            if share > limit:
                kinds = ", ".join(sorted(self.vectors[comp.vector].dropped))
                raise TunevecError(
                    f"vector {comp.vector!r} (as {str(comp)!r}): {share:.2%} of its ||tau||^2 is not carried per "
                    f"request by this engine ({kinds}), above the server's max_dropped_share "
                    f"{format_number(limit)}; serve it exactly with `tunevec serve --inject`, or raise "
                    "--max-dropped-share"
                )
        ranks = self.module_ranks(spec)
        summed = max(ranks.values(), default=0)
        if summed == 0 and not self.deltas(spec):
            raise TunevecError(
                f"spec {spec.canonical()!r} selects no module an adapter carries (check its scopes)"
            )
        cap = self.settings.max_lora_rank
        if summed > cap and not self.settings.allow_truncation:
            raise TunevecError(
                f"mixture {spec.canonical()!r} has rank {summed}, above the server's max LoRA rank {cap}; use "
                "fewer components, or start the server with --allow-truncation"
            )
        name = served_name(spec)
        lora_id = adapter_id(name, [(v, self.vectors[v].digest) for v in spec.vectors], self.settings)
        self._ids.claim(lora_id, name)
        request = mixture_request(name, lora_id, spec.canonical())
        return Mixture(spec, name, request, min(summed, cap), summed > cap, left_out)

    def deltas(self, spec: Spec) -> list[str]:
        """The whole tensors (norms, biases) the spec's components move, applied per request as they are."""
        return sorted(
            {
                n
                for c in spec.components
                if c.alpha != 0
                for n in self.vectors[c.vector].deltas
                if c.applies_to(n)
            }
        )

    def describe(self, spec: Spec) -> dict:
        """What a spec would run as, without serving it: rank per module, truncation, what adapters leave out."""
        ranks = self.module_ranks(spec)
        summed = max(ranks.values(), default=0)
        return {
            "canonical": spec.canonical(),
            "served_name": served_name(spec),
            "vectors": list(spec.vectors),
            "method": spec.method,
            "rank": summed,
            "modules": dict(sorted(ranks.items())),  # checkpoint tensors the adapters carry, with their ranks
            "deltas": self.deltas(spec),  # norm and bias tensors carried whole
            "max_rank": self.settings.max_lora_rank,
            "needs_truncation": summed > self.settings.max_lora_rank,
            "truncation_allowed": self.settings.allow_truncation,
            "dropped_share": {str(c): self.dropped_share(c) for c in spec.components},
            "max_dropped_share": self.settings.max_dropped_share,
            "vector_adapters": {
                v: {
                    "dropped": self.vectors[v].dropped,
                    "rank": max(self.vectors[v].module_ranks.values(), default=0),
                }
                for v in spec.vectors
            },
        }
