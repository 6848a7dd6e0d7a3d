"""Low-rank adapters from tuning vectors, and exact mixtures of them.

Each vector is factorised once per server (``factor_cache``): every 2-D tensor of tau that a LoRA slot can carry
(attention and MLP projections, the input embedding and output head) becomes B (out x r) A (r x in), at a fixed
rank or at the smallest rank keeping a share of its energy. Norm weights and biases and the linear layers' biases
have no LoRA slot; they are kept whole as **deltas** (``LoraAdapter.deltas``), which the server applies per request
exactly (``tunevec.steering.vllm``: per-slot norm weights and bias adds). Tensors whose tau is zero are left out,
so they cost nothing when served. What is neither factorised nor kept whole is recorded per vector as
``dropped`` (its share of ||tau||^2).

A mixture sum_i alpha_i * B_i A_i is itself one LoRA: B = [alpha_1 B_1 ... alpha_k B_k], A = [A_1; ...; A_k], of rank
sum r_i. That identity makes per-request mixing exact (``compose``); only when the summed rank exceeds the engine's
maximum is the mixture re-truncated by an SVD (computed from QR factors of the stacked matrices), and the error
reported. The server composes mixtures in memory inside vLLM's workers (``steering/vllm_lora.py``); the PEFT
folder format (``LoraAdapter.save``) serves ``tunevec lora`` and the per-vector factor cache.

PEFT contract honoured by ``save`` (what vLLM 0.32's PEFT loader reads): ``adapter_config.json`` with
``r == lora_alpha`` so the scale alpha/r is exactly 1, ``r`` from vLLM's allowed ``max_lora_rank`` set, no
``modules_to_save``; per-module ranks are zero-padded to ``r`` and the true ranks kept in ``tunevec_adapter.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from tunevec.core.errors import TunevecError
from tunevec.core.files import StagedFolder
from tunevec.core.linalg import factorise
from tunevec.core.roles import classify
from tunevec.core.vector import TuningVector
from tunevec.steering.spec import Spec

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_META = "tunevec_adapter.json"
DELTAS_FILE = "tunevec_deltas.safetensors"  # the 1-D deltas (norms, biases), beside the PEFT factors
# Roles whose 2-D weights a LoRA slot carries (vLLM wraps linear layers, the input embedding and the output head).
CARRIED_ROLES = frozenset({"attention", "mlp", "embedding", "head", "other"})
# The module vLLM's LoRA manager wraps as the output head (LogitsProcessorWithLoRA).
HEAD = "lm_head.weight"
# Bumped whenever what ``adapter_from_vector`` writes changes, so factor caches from older code are not reused.
FACTORS_VERSION = 4
_PEFT_PREFIX = "base_model.model."


def vllm_rank(r: int) -> int:
    """The smallest rank vLLM accepts that is >= r."""
    for allowed in VLLM_RANKS:
        if allowed >= r:
            return allowed
    raise TunevecError(f"rank {r} exceeds vLLM's maximum LoRA rank {VLLM_RANKS[-1]}")


@dataclass
class LoraAdapter:
    """Per module (HF weight name, e.g. ``model.layers.0.mlp.up_proj.weight``): B (out x r_m), A (r_m x in)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    meta: dict = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # 1-D tensors of tau kept whole

    @property
    def max_module_rank(self) -> int:
        return max((b.shape[1] for b, _ in self.factors.values()), default=0)

    def delta(self, name: str) -> torch.Tensor | None:
        f = self.factors.get(name)
        return None if f is None else f[0] @ f[1]

    def save(self, path: str | os.PathLike[str], *, base_model: str = "") -> Path:
        """Write PEFT files; every module is zero-padded to the adapter's rank r, with lora_alpha = r."""
        r = vllm_rank(max(self.max_module_rank, 1))
        padded = {}
        for name, (b, a) in self.factors.items():
            rm = b.shape[1]
            b_pad = torch.zeros(b.shape[0], r, dtype=torch.float32)
            a_pad = torch.zeros(r, a.shape[1], dtype=torch.float32)
            b_pad[:, :rm], a_pad[:rm] = b, a
            padded[name] = (b_pad, a_pad)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": r,
            "lora_alpha": r,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": sorted({leaf_module(n) for n in self.factors}),
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
        }
        ranks = {name: b.shape[1] for name, (b, _) in self.factors.items()}
        with StagedFolder(path, replace=True) as tmp:
            save_file(peft_tensors(padded), tmp / "adapter_model.safetensors")
            digest = hashlib.sha256((tmp / "adapter_model.safetensors").read_bytes()).hexdigest()
            extra = {}
            if self.deltas:
                save_file({n: t.float().contiguous() for n, t in self.deltas.items()}, tmp / DELTAS_FILE)
                extra["deltas_sha256"] = hashlib.sha256((tmp / DELTAS_FILE).read_bytes()).hexdigest()
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
            (tmp / ADAPTER_META).write_text(
                json.dumps(
                    {**self.meta, "r": r, "module_ranks": ranks, "tensors_sha256": digest, **extra}, indent=1
                )
            )
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LoraAdapter:
        p = Path(path)
        try:
            config = json.loads((p / "adapter_config.json").read_text())
            # Read into memory owned here, not mapped: a worker keeps these factors for its lifetime, and a file
            # truncated under a mapping kills the process (SIGBUS) on the next access.
            raw = (p / "adapter_model.safetensors").read_bytes()
            meta = json.loads((p / ADAPTER_META).read_text()) if (p / ADAPTER_META).exists() else {}
            want = meta.get("tensors_sha256")
            if want is not None and hashlib.sha256(raw).hexdigest() != want:
                raise TunevecError("adapter_model.safetensors does not match its recorded checksum")
            tensors = load(raw)
            scale = config["lora_alpha"] / config["r"]
            deltas = {}
            if meta.get("deltas_sha256") is not None:
                raw = (p / DELTAS_FILE).read_bytes()
                if hashlib.sha256(raw).hexdigest() != meta["deltas_sha256"]:
                    raise TunevecError(f"{DELTAS_FILE} does not match its recorded checksum")
                deltas = load(raw)
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise TunevecError(f"{p}: not a readable PEFT LoRA adapter folder: {exc}") from exc
        # Our own adapters record each module's true rank, so the zero padding is dropped again on load
        # (otherwise stacking padded factors would inflate a mixture's rank).
        ranks = meta.get("module_ranks", {})
        factors = {}
        for name, (b, a) in from_peft_tensors(tensors).items():
            rm = ranks.get(name, config["r"])
            factors[name] = (b[:, :rm] * scale, a[:rm])
        return cls(factors, meta, deltas)


def lora_targets(tensors: list[str]) -> list[str]:
    """vLLM's ``--lora-target-modules`` for adapters carrying ``tensors``: each factorised or biased linear layer's
    leaf name, and ``lm_head`` for an output head, which vLLM wraps under that name whatever the checkpoint calls it
    (GPT-NeoX: ``embed_out``)."""
    out = set()
    for name in tensors:
        role = classify(name)
        if role.role == "head":
            out.add("lm_head")
        elif role.role != "norm" and (name.endswith(".weight") or (role.param == "bias" and role.is_linear)):
            out.add(leaf_module(name))
    return sorted(out)


def leaf_module(name: str) -> str:
    """The module a weight belongs to, as PEFT's ``target_modules`` names it: ``...q_proj.weight`` -> ``q_proj``."""
    return name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]


def peft_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """PEFT tensor names for per-module (B, A) factors keyed by checkpoint tensor name (``....weight``).

    An embedding table takes PEFT's embedding layout: ``lora_embedding_A`` ``[r, vocab]`` and
    ``lora_embedding_B`` ``[dim, r]``, whose product is the transposed delta.
    """
    out = {}
    for name, (b, a) in factors.items():
        module = _PEFT_PREFIX + name.removesuffix(".weight")
        if classify(name).role == "embedding":
            out[f"{module}.lora_embedding_A"] = b.T.contiguous()
            out[f"{module}.lora_embedding_B"] = a.T.contiguous()
        else:
            out[f"{module}.lora_A.weight"] = a.contiguous()
            out[f"{module}.lora_B.weight"] = b.contiguous()
    return out


def from_peft_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of ``peft_tensors``: (B, A) per checkpoint tensor name."""
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module.removeprefix(_PEFT_PREFIX) + ".weight"] = (tensors[module + ".lora_B.weight"], a)
        elif key.endswith(".lora_embedding_A"):
            module = key.removesuffix(".lora_embedding_A")
            b_t = tensors[module + ".lora_embedding_B"]
            out[module.removeprefix(_PEFT_PREFIX) + ".weight"] = (a.T, b_t.T)
    return out


def carried(name: str, shape: list[int] | tuple[int, ...]) -> bool:
    """Whether a LoRA slot can carry this tensor's delta: a 2-D weight of an attention, MLP, embedding or head."""
    return len(shape) == 2 and name.endswith(".weight") and classify(name).role in CARRIED_ROLES


def kept_whole(name: str, shape: list[int] | tuple[int, ...]) -> bool:
    """Whether the server carries this tensor's delta whole, per request: a norm's weight or bias, or the bias of a
    linear layer (the engine adds it to that layer's output)."""
    if len(shape) != 1:
        return False
    role = classify(name)
    return role.role == "norm" or (role.param == "bias" and role.role in ("attention", "mlp", "head"))


def dropped_kind(name: str) -> str:
    """How an uncarried tensor is reported: ``bias``, or its role (``norm``, ``head``, ...)."""
    return "bias" if name.endswith(".bias") else classify(name).role


def adapter_from_vector(
    vector: TuningVector,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int = 512,
    method: str = "randomized",
    seed: int = 0,
) -> LoraAdapter:
    """Factorise every carried tensor of tau (rank-r, or the smallest rank reaching ``energy`` of ||tau||^2).

    Tensors whose tau is exactly zero are not factorised: they are absent from the adapter and cost nothing. With
    tied embeddings the one embedding tensor is also the output head, so its factors serve both (``lm_head``).
    """
    if (rank is None) == (energy is None):
        raise TunevecError("give exactly one of --rank or --energy")
    if rank is not None and not 1 <= rank <= max_rank:
        raise TunevecError(f"rank {rank} outside 1..{max_rank}")
    entries = vector.manifest.tensors
    wanted = [n for n, e in entries.items() if carried(n, e.shape) and e.norm > 0]
    whole = [n for n, e in entries.items() if kept_whole(n, e.shape) and e.norm > 0]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, dict] = {}
    deltas = {name: tau.to(torch.float32) for name, tau in vector.stream(whole)}
    for name, tau in vector.stream(wanted):
        # the rank is an upper bound: a module narrower than it (a small model's k/v projections) is kept exactly
        full = min(tau.shape[0], tau.numel() // max(tau.shape[0], 1))
        lr = factorise(
            tau.to(torch.float32),
            rank=None if rank is None else min(rank, full),
            energy=energy,
            method=method,
            max_rank=max_rank,
            seed=seed,
        )
        factors[name] = (lr.B, lr.A)
        modules[name] = {"rank": lr.rank, "rel_error": lr.rel_error, "energy": lr.energy}
    if vector.manifest.policies.get("tied_embeddings") and HEAD not in factors:
        tied = [n for n in factors if classify(n).role == "embedding"]
        if len(tied) == 1:
            factors[HEAD] = factors[tied[0]]
            modules[HEAD] = {**modules[tied[0]], "tied_to": tied[0]}
    total = sum(e.norm**2 for e in entries.values())
    dropped: dict[str, float] = {}
    for name, e in entries.items():
        if not carried(name, e.shape) and not kept_whole(name, e.shape) and e.norm > 0:
            kind = dropped_kind(name)
            dropped[kind] = dropped.get(kind, 0.0) + e.norm**2
    meta = {
        "vector": vector.name,
        "content_digest": vector.content_digest,
        "base_fingerprint": vector.manifest.base.get("fingerprint"),
        "method": method,
        "rank": rank,
        "energy_target": energy,
        "modules": modules,
        "deltas": sorted(deltas),
        # Share of ||tau||^2 that neither a LoRA slot nor a whole delta carries, by kind.
        "dropped": {kind: e / total if total else 0.0 for kind, e in dropped.items()},
    }
    return LoraAdapter(factors, meta, deltas)


def factor_cache(
    vector: TuningVector,
    cache_dir: str | os.PathLike[str],
    *,
    rank: int | None,
    energy: float | None,
    max_rank: int,
    rebuild: bool = False,
) -> Path:
    """The folder holding ``vector``'s factors at these settings, factorised now if it is not there yet (or if
    ``rebuild``: a folder found damaged is written again).

    Named by the vector's name, content digest and settings, so a re-extracted vector, or other settings, get a
    folder of their own and stale factors are never read.
    """
    how = f"r{rank}" if rank is not None else f"e{energy}"
    digest = vector.content_digest
    path = Path(cache_dir) / "vectors" / f"{vector.name}-{digest[:16]}-{how}-m{max_rank}-v{FACTORS_VERSION}"
    meta_file = path / ADAPTER_META
    if meta_file.exists() and not rebuild:
        try:
            if json.loads(meta_file.read_text()).get("content_digest") == digest:
                return path
        except (OSError, ValueError):
            pass  # unreadable: factorise again below
    adapter = adapter_from_vector(vector, rank=rank, energy=energy, max_rank=max_rank)
    adapter.save(path)
    return path


def read_meta(path: str | os.PathLike[str]) -> dict:
    """A factor folder's ``tunevec_adapter.json`` (ranks per module, dropped shares, content digest)."""
    try:
        return json.loads((Path(path) / ADAPTER_META).read_text())
    except (OSError, ValueError) as exc:
        raise TunevecError(f"{path}: unreadable adapter metadata: {exc}") from exc


def truncate(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k approximation of B @ A without forming it: QR of both factors, SVD of the small core.

    With B = Q_b R_b and A^T = Q_a R_a, B A = Q_b (R_b R_a^T) Q_a^T, so the SVD of the R x R core gives the
    singular values of BA. Returns (B', A', relative Frobenius error), in the factors' dtype (computed in float32).
    """
    dtype = b.dtype
    b, a = b.float(), a.float()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    root = s[:k].sqrt()
    b_new = (qb @ u[:, :k]) * root
    a_new = root[:, None] * (vh[:k] @ qa.T)
    err = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    return b_new.to(dtype), a_new.to(dtype), err


def compose(spec: Spec, adapters: dict[str, LoraAdapter], *, max_rank: int) -> LoraAdapter:
    """The adapter for a linear spec: sum over components of alpha * B A, restricted to each component's scope.

    Exact (stacked factors) while every module's summed rank fits ``max_rank``; otherwise that module is
    re-truncated to ``max_rank`` and its error recorded in ``meta["truncated"]``. The result keeps the factors'
    dtype: the server keeps resident factors in the engine's LoRA dtype, so composing converts nothing.
    """
    if spec.method != "linear":
        raise TunevecError(
            f"per-request adapters are exact only for linear mixtures; {spec.method!r} needs full-rank injection "
            "(a named injected variant, or `tunevec merge`)"
        )
    stacks: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for comp in spec.components:
        adapter = adapters[comp.vector]
        for name, (b, a) in adapter.factors.items():
            if comp.applies_to(name) and comp.alpha != 0:
                bs, as_ = stacks.setdefault(name, ([], []))
                bs.append(comp.alpha * b)
                as_.append(a)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    truncated: dict[str, float] = {}
    for name, (bs, as_) in stacks.items():
        b, a = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        if b.shape[1] > max_rank:
            b, a, err = truncate(b, a, max_rank)
            truncated[name] = err
        factors[name] = (b.contiguous(), a.contiguous())
    meta = {
        "spec": spec.canonical(),
        "components": {c.vector: adapters[c.vector].meta.get("vector_path") for c in spec.components},
        "truncated": truncated,
        "max_rel_error": max(truncated.values(), default=0.0),
    }
    return LoraAdapter(factors, meta)
