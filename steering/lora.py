"""Low-rank adapters from tuning vectors, and exact mixtures of them, in the PEFT format vLLM loads as it is.

Contract (what vLLM 0.32's PEFT loader honours, see docs/adapters.md):
- ``adapter_config.json`` with ``r == lora_alpha`` so vLLM's scale alpha/r is exactly 1 (vLLM ignores
  ``rank_pattern``/``alpha_pattern``, so per-module ranks are zero-padded to one ``r`` instead);
- ``r`` from vLLM's allowed ``max_lora_rank`` set; no ``modules_to_save`` (vLLM refuses it);
- only linear projections (q/k/v/o, gate/up/down). Embedding, head and norm deltas have no vLLM LoRA slot that
  is kept going forward; they are left out and the energy share they carry is recorded as ``dropped``.

A mixture sum_i alpha_i * B_i A_i is itself one LoRA: B = [alpha_1 B_1 ... alpha_k B_k], A = [A_1; ...; A_k], of rank
sum r_i. That identity makes per-request mixing exact; only when the summed rank exceeds the engine's maximum is
the mixture re-truncated by an SVD (computed from QR factors of the stacked matrices), and the error reported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tunevec.steering.spec import Spec

from tunevec.core.errors import TunevecError
from tunevec.core.linalg import factorise
from tunevec.core.roles import classify
from tunevec.core.vector import TuningVector

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_META = "tunevec_adapter.json"
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

    @property
    def max_module_rank(self) -> int:
        return max((b.shape[1] for b, _ in self.factors.values()), default=0)

    def delta(self, name: str) -> torch.Tensor | None:
        f = self.factors.get(name)
        return None if f is None else f[0] @ f[1]

    def save(self, path: str | os.PathLike[str], *, base_model: str = "") -> Path:
        """Write PEFT files; every module is zero-padded to the adapter's rank r, with lora_alpha = r."""
        out = Path(path)
        r = vllm_rank(max(self.max_module_rank, 1))
        tensors: dict[str, torch.Tensor] = {}
        for name, (b, a) in self.factors.items():
            rm = b.shape[1]
            b_pad = torch.zeros(b.shape[0], r, dtype=torch.float32)
            a_pad = torch.zeros(r, a.shape[1], dtype=torch.float32)
            b_pad[:, :rm], a_pad[:rm] = b, a
            module = _PEFT_PREFIX + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = a_pad.contiguous()
            tensors[f"{module}.lora_B.weight"] = b_pad.contiguous()
        targets = sorted({classify(n).module for n in self.factors if classify(n).module})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": r,
            "lora_alpha": r,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": targets,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
        }
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
        ranks = {name: b.shape[1] for name, (b, _) in self.factors.items()}
        (tmp / ADAPTER_META).write_text(json.dumps({**self.meta, "r": r, "module_ranks": ranks}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LoraAdapter:
        p = Path(path)
        try:
            config = json.loads((p / "adapter_config.json").read_text())
            tensors = load_file(p / "adapter_model.safetensors")
        except (OSError, json.JSONDecodeError) as exc:
            raise TunevecError(f"{p}: not a PEFT LoRA adapter folder: {exc}") from exc
        scale = config["lora_alpha"] / config["r"]
        meta = json.loads((p / ADAPTER_META).read_text()) if (p / ADAPTER_META).exists() else {}
        # Our own adapters record each module's true rank, so the zero padding is dropped again on load
        # (otherwise stacking padded factors would inflate a mixture's rank).
        ranks = meta.get("module_ranks", {})
        factors = {}
        for key in tensors:
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                name = module.removeprefix(_PEFT_PREFIX) + ".weight"
                rm = ranks.get(name, config["r"])
                factors[name] = (tensors[module + ".lora_B.weight"][:, :rm] * scale, tensors[key][:rm])
        return cls(factors, meta)


def adapter_from_vector(
    vector: TuningVector,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int = 512,
    method: str = "randomized",
    seed: int = 0,
) -> LoraAdapter:
    """Factorise every linear module of tau (rank-r, or the smallest rank reaching ``energy`` of ||tau||^2)."""
    if (rank is None) == (energy is None):
        raise TunevecError("give exactly one of --rank or --energy")
    if rank is not None and not 1 <= rank <= max_rank:
        raise TunevecError(f"rank {rank} outside 1..{max_rank}")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, dict] = {}
    dropped: dict[str, float] = {}
    total = 0.0
    for name, tau in vector.stream():
        entry = vector.manifest.tensors[name]
        total += entry.norm**2
        if classify(name).module not in TARGET_MODULES or tau.dim() != 2:
            dropped[entry.role] = dropped.get(entry.role, 0.0) + entry.norm**2
            continue
        lr = factorise(
            tau.to(torch.float32), rank=rank, energy=energy, method=method, max_rank=max_rank, seed=seed
        )
        factors[name] = (lr.B, lr.A)
        modules[name] = {"rank": lr.rank, "rel_error": lr.rel_error, "energy": lr.energy}
    meta = {
        "vector": vector.name,
        "vector_path": str(vector.path.resolve()),
        "base_fingerprint": vector.manifest.base.get("fingerprint"),
        "method": method,
        "rank": rank,
        "energy_target": energy,
        "modules": modules,
        # Share of ||tau||^2 that no LoRA slot carries (embeddings, norms, head), by role.
        "dropped": {role: e / total if total else 0.0 for role, e in dropped.items()},
    }
    return LoraAdapter(factors, meta)


def truncate(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k approximation of B @ A without forming it: QR of both factors, SVD of the small core.

    With B = Q_b R_b and A^T = Q_a R_a, B A = Q_b (R_b R_a^T) Q_a^T, so the SVD of the R x R core gives the
    singular values of BA. Returns (B', A', relative Frobenius error).
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    root = s[:k].sqrt()
    b_new = (qb @ u[:, :k]) * root
    a_new = root[:, None] * (vh[:k] @ qa.T)
    err = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    return b_new, a_new, err


def compose(spec: Spec, adapters: dict[str, LoraAdapter], *, max_rank: int) -> LoraAdapter:
    """The adapter for a linear spec: sum over components of alpha * B A, restricted to each component's scope.

    Exact (stacked factors) while every module's summed rank fits ``max_rank``; otherwise that module is
    re-truncated to ``max_rank`` and its error recorded in ``meta["truncated"]``.
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
