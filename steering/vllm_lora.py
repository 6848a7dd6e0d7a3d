"""vLLM's worker side of per-request mixtures: adapters composed in memory, run by the grouped LoRA op.

A mixture reaches the engine as an ordinary ``LoRARequest`` whose path is ``tunevec-mixture:<canonical spec>``.
Nothing is written to disk for it. In each worker process:

- every vector's low-rank factors (factorised once per server, ``steering/lora.py``) are read from the factor cache
  on first use and stay resident, checked against the content digest the server announced;
- ``_load_adapter`` composes the mixture's ``LoRAModel`` from them in memory (the exact stacked sum of
  ``alpha_i * B_i A_i``, ``steering.lora.compose``) and hands it to vLLM's own loader, so packing (q/k/v into
  qkv_proj ...), name mapping, slots and the LRU are vLLM's;
- on CPU the platform's punica wrapper becomes ``PunicaWrapperGrouped`` (``steering/punica_grouped.py``), told on
  every slot activation to drop what it derived from the slot's old weights.

The vectors a worker may use come from the ``TUNEVEC_MIXTURE_VECTORS`` environment variable (name -> factor folder
and content digest), set by ``tunevec serve`` before vLLM spawns its engine. A request can only name a spec; the
factor folders are the server's, so a client cannot make the engine read anything else.

``install()`` touches two vLLM names, in one version-checked place: the model runner's worker LoRA manager class
and, on CPU, the platform's punica-wrapper selection.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

logger = logging.getLogger("vllm.tunevec.lora")

MIXTURE_PREFIX = "tunevec-mixture:"
VECTORS_ENV = "TUNEVEC_MIXTURE_VECTORS"
VERIFIED_VLLM_VERSIONS = frozenset({"0.32.0"})
GROUPED_WRAPPER = "tunevec.steering.punica_grouped.PunicaWrapperGrouped"
_CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


def mixture_path(canonical: str) -> str:
    """The ``lora_path`` that names a mixture to the engine."""
    return MIXTURE_PREFIX + canonical


def vectors_env(vectors: dict[str, dict[str, str]]) -> str:
    """The ``TUNEVEC_MIXTURE_VECTORS`` value for ``{name: {"path": factor folder, "digest": content digest}}``."""
    return json.dumps(vectors, sort_keys=True)


class ResidentFactors:
    """Each vector's factors, read once per process and kept; a digest that changed is read again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_digest: dict[tuple[str, Any], Any] = {}
        self.version = (
            0  # bumped whenever a vector is read in: what a stack of all resident factors holds changed
        )

    def announced(self) -> dict[str, dict[str, str]]:
        raw = os.environ.get(VECTORS_ENV)
        if not raw:
            raise RuntimeError(f"{VECTORS_ENV} is not set; per-request mixtures need `tunevec serve`")
        return json.loads(raw)

    def adapters(self, names: tuple[str, ...], dtype: Any) -> dict[str, Any]:
        """The named vectors' factors in ``dtype`` (converted once: a conversion per mixture would cost more than
        composing it on CPUs without native bfloat16)."""
        from tunevec.steering.lora import LoraAdapter

        announced = self.announced()
        out = {}
        with self._lock:
            for name in names:
                entry = announced.get(name)
                if entry is None:
                    raise ValueError(f"mixture names vector {name!r}, which this server does not serve")
                digest = entry["digest"]
                adapter = self._by_digest.get((digest, dtype))
                if adapter is None:
                    adapter = LoraAdapter.load(entry["path"])
                    found = adapter.meta.get("content_digest")
                    if found != digest:
                        raise ValueError(
                            f"factor cache {entry['path']} holds vector content {found}, the server announced "
                            f"{digest}; restart the server to refactorise"
                        )
                    factors = {n: (b.to(dtype), a.to(dtype)) for n, (b, a) in adapter.factors.items()}
                    adapter = LoraAdapter(factors, adapter.meta)
                    self._by_digest[(digest, dtype)] = adapter
                    self.version += 1
                out[name] = adapter
        return out

    def resident(self, dtype: Any) -> dict[str, Any]:
        """The announced vectors already read in ``dtype``, by name."""
        with self._lock:
            return {
                name: self._by_digest[(entry["digest"], dtype)]
                for name, entry in sorted(self.announced().items())
                if (entry["digest"], dtype) in self._by_digest
            }


RESIDENT = ResidentFactors()
# Adapter id -> its spec, for mixtures composed exactly (not re-truncated): what MixtureFactors needs to serve them
# as coefficients over the resident factors. Bounded; an id that fell out is served from its slot's own weights.
SPECS: OrderedDict[int, Any] = OrderedDict()
SPECS_KEPT = 4096


class MixtureFactors:
    """tunevec's mixtures as coefficients over the resident vectors' factors (``FactoredAdapters``, CPU op).

    The stack of a module holds, for every resident vector and every checkpoint tensor that lands in that vLLM
    module (a packed part such as q_proj of qkv_proj lands at its slice's output rows), the tensor's factors. A
    mixture's coefficients are its components' alphas on the columns of the tensors they apply to.
    """

    def __init__(self, manager: Any):
        self._manager = manager
        mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
        self._mapper = None if mapper is None else mapper.get_rename_mapper()
        self._version = -1
        self._stacks: dict[tuple[str, Any], Any] = {}
        self._columns: dict[tuple[str, Any], list[tuple[str, str, int, int]]] = {}
        self._coefs: dict[tuple[int, str, Any], Any] = {}
        self._targets: dict[str, tuple[str, int, int] | None] = {}

    def _fresh(self) -> None:
        if RESIDENT.version != self._version:
            self._stacks.clear()
            self._columns.clear()
            self._coefs.clear()
            self._version = RESIDENT.version

    def _target(self, tensor: str) -> tuple[str, int, int] | None:
        """(vLLM module, first output row, rows) a checkpoint tensor's delta lands on; None for the embedding."""
        if tensor in self._targets:
            return self._targets[tensor]
        import torch
        from vllm.lora.utils import parse_fine_tuned_lora_name

        from tunevec.steering.lora import peft_tensors

        if unfaithful(self._manager.model, tensor):
            self._targets[tensor] = None
            return None
        dummy = torch.zeros(1, 1)
        module, _ = parse_fine_tuned_lora_name(
            next(iter(peft_tensors({tensor: (dummy, dummy)}))), self._mapper
        )
        modules, found = self._manager.modules, None
        if module in modules and hasattr(modules[module], "output_slices"):
            found = (module, 0, sum(modules[module].output_slices))
        elif module in modules and module.endswith("lm_head"):
            found = (module, 0, modules[module].lora_b_stacked.shape[2])
        else:
            for parent, parts in self._manager.packed_modules.items():
                if module in parts and parent in modules:
                    sizes = modules[parent].output_slices
                    i = parts.index(module)
                    found = (parent, sum(sizes[:i]), sizes[i])
        self._targets[tensor] = found
        return found

    def stack(self, module: str, dtype: Any) -> Any:
        import torch

        from tunevec.steering.punica_grouped import _Pack

        self._fresh()
        key = (module, dtype)
        if key not in self._stacks:
            blocks, columns, col = [], [], 0
            for name, adapter in RESIDENT.resident(dtype).items():
                for tensor, (b, a) in adapter.factors.items():
                    target = self._target(tensor)
                    if target is not None and target[0] == module:
                        blocks.append((target, b, a))
                        columns.append((name, tensor, col, col + b.shape[1]))
                        col += b.shape[1]
            if not blocks:
                self._stacks[key], self._columns[key] = None, []
            else:
                layer = self._manager.modules[module]
                if hasattr(layer, "output_slices"):
                    rows_total = sum(layer.output_slices)
                else:  # the output head: its vocabulary
                    rows_total = layer.lora_b_stacked.shape[2]
                b_all = torch.zeros(rows_total, col, dtype=dtype)
                for ((_, row, rows), b, _), (_, _, c0, c1) in zip(blocks, columns, strict=True):
                    b_all[row : row + rows, c0:c1] = b
                a_all = torch.cat([a for _, _, a in blocks], dim=0).contiguous()
                self._stacks[key], self._columns[key] = _Pack(a_all, b_all), columns
        return self._stacks[key]

    def coefficients(self, lora_id: int, module: str, dtype: Any) -> Any:
        import torch

        spec = SPECS.get(lora_id)
        if spec is None:
            return None
        self._fresh()
        key = (lora_id, module, dtype)
        if key not in self._coefs:
            self.stack(module, dtype)
            coef = torch.zeros(sum(c1 - c0 for _, _, c0, c1 in self._columns[(module, dtype)]), dtype=dtype)
            for vector, tensor, c0, c1 in self._columns[(module, dtype)]:
                for comp in spec.components:
                    if comp.vector == vector and comp.applies_to(tensor):
                        coef[c0:c1] = comp.alpha
            self._coefs[key] = coef
        return self._coefs[key]


def compose_lora_model(manager: Any, lora_request: Any) -> Any:
    """The mixture's ``LoRAModel``, composed from resident factors with vLLM's own tensor-dict loader."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    from tunevec.steering.lora import compose, peft_tensors
    from tunevec.steering.spec import Spec

    spec = Spec.parse(lora_request.lora_path.removeprefix(MIXTURE_PREFIX))
    max_rank = manager.lora_config.max_lora_rank
    adapter = compose(
        spec, RESIDENT.adapters(spec.vectors, manager.lora_config.lora_dtype), max_rank=max_rank
    )
    model = manager._adapter_manager.model
    if any(unfaithful(model, t) for t in adapter.factors):
        factors = {t: f for t, f in adapter.factors.items() if not unfaithful(model, t)}
        adapter = type(adapter)(factors, adapter.meta)
    if not adapter.factors:
        raise ValueError(f"mixture {spec.canonical()!r} selects no module this engine can adapt")
    # alpha == r: vLLM's scale alpha / r is exactly 1 for every module, whatever its own rank.
    helper = PEFTHelper(r=max_rank, lora_alpha=max_rank, target_modules=[])
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=lora_request.lora_int_id,
        tensors=peft_tensors(adapter.factors),
        peft_helper=helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    lora.is_3d_lora_weight = False
    if not adapter.meta.get("truncated"):
        SPECS[lora_request.lora_int_id] = spec
        SPECS.move_to_end(lora_request.lora_int_id)
        while len(SPECS) > SPECS_KEPT:
            SPECS.popitem(last=False)
    return lora


class TunevecWorkerExtension:
    """Mixed into vLLM's worker (``--worker-extension-cls``), reached through ``engine_client.collective_rpc``."""

    def tunevec_carried(self, tensor_names: list[str]) -> list[str]:
        """The checkpoint tensors whose deltas this engine's LoRA modules receive.

        Decided the way vLLM's loader decides it: a tensor's PEFT name is parsed with the model's weight mapper
        into a module name, which must be a LoRA-wrapped module, or a packed part of one (q_proj of qkv_proj).
        Anything else would be dropped without a word by vLLM, so the server reports and checks it instead.
        """
        import torch
        from vllm.lora.utils import parse_fine_tuned_lora_name

        from tunevec.steering.lora import peft_tensors

        manager = self.model_runner.lora_manager._adapter_manager
        mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
        mapper = None if mapper is None else mapper.get_rename_mapper()
        wrapped = set(manager.modules)
        for parent, parts in manager.packed_modules.items():
            if parent in wrapped:
                wrapped.update(parts)
        dummy = torch.zeros(1, 1)
        out = []
        for name in tensor_names:
            keys = peft_tensors({name: (dummy, dummy)})
            module, _ = parse_fine_tuned_lora_name(next(iter(keys)), mapper)
            if module in wrapped and not unfaithful(manager.model, name):
                out.append(name)
        return out


def unfaithful(model, tensor: str) -> bool:
    """Whether this engine's LoRA would not reproduce base + tau for ``tensor``: an embedding or head delta on a
    model that multiplies its input embeddings by a normaliser (Gemma's sqrt(hidden)).

    On such models vLLM's embedding and tied-head LoRA did not reproduce base + tau: a Gemma 2 mixture served
    0.29 nats per token away from transformers while its attention and MLP parts matched to 4e-3
    (tests/test_architectures.py). Their embedding and head deltas are neither composed nor stacked, and the
    server reports them as left out (the x-tunevec-left-out header, the --max-dropped-share check).
    """
    from tunevec.core.roles import classify

    inner = getattr(model, "model", None)
    return getattr(inner, "normalizer", None) is not None and classify(tensor).role in ("embedding", "head")


def install() -> bool:
    """Route mixtures through in-memory composition and, on CPU, the grouped op. Idempotent; False if skipped."""
    import vllm

    version = vllm.__version__.split("+")[0]
    if version not in VERIFIED_VLLM_VERSIONS:
        logger.warning(
            "tunevec: vLLM %s is not a version the mixture path was verified on (%s); per-request mixtures are "
            "off (requests for them fail with a clear error)",
            version,
            ", ".join(sorted(VERIFIED_VLLM_VERSIONS)),
        )
        return False
    from vllm.lora.model_manager import LRUCacheLoRAModelManager
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.platforms import current_platform
    from vllm.v1.worker import lora_model_runner_mixin

    from tunevec.steering.punica_grouped import PunicaWrapperGrouped

    if getattr(lora_model_runner_mixin.LRUCacheWorkerLoRAManager, "_tunevec", False):
        return True

    class GroupedLoRAModelManager(LRUCacheLoRAModelManager):
        """vLLM's LRU manager that names its LoRA layers to grouped wrappers and tells them when a slot changes."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # The shared-factor stacks hold whole tensors: under tensor parallelism each rank would need its shard.
            sharded = any(getattr(m, "tp_size", 1) > 1 for m in self.modules.values())
            for wrapper in self.punica_wrapper_mapping.values():
                if isinstance(wrapper, PunicaWrapperGrouped):
                    wrapper.bind(self.modules, None if sharded else MixtureFactors(self))

        def activate_adapter(self, lora_id: int) -> bool:
            activated = super().activate_adapter(lora_id)
            if activated:
                slot = self.lora_index_to_id.index(lora_id)
                for wrapper in self.punica_wrapper_mapping.values():
                    if isinstance(wrapper, PunicaWrapperGrouped):
                        wrapper.invalidate_slot(slot)
            return activated

    class TunevecWorkerLoRAManager(LRUCacheWorkerLoRAManager):
        """vLLM's worker LoRA manager; ``tunevec-mixture:`` paths are composed in memory, others load as usual."""

        _tunevec = True
        _manager_cls = GroupedLoRAModelManager

        def _load_adapter(self, lora_request):  # noqa: ANN001, ANN202
            if not lora_request.lora_path.startswith(MIXTURE_PREFIX):
                return super()._load_adapter(lora_request)
            return compose_lora_model(self, lora_request)

    lora_model_runner_mixin.LRUCacheWorkerLoRAManager = TunevecWorkerLoRAManager
    platform_cls = type(current_platform)
    if current_platform.is_cpu() and platform_cls.get_punica_wrapper() == _CPU_WRAPPER:
        platform_cls.get_punica_wrapper = classmethod(lambda cls: GROUPED_WRAPPER)
    logger.info(
        "tunevec: in-memory mixtures installed (punica wrapper %s)", current_platform.get_punica_wrapper()
    )
    return True
