"""vLLM's worker side of per-request mixtures: the LoRA manager that composes them, and the worker extension.

A mixture reaches the engine as an ordinary ``LoRARequest`` whose path is ``tunevec-mixture:<canonical spec>``;
nothing is written to disk for it. In each worker process:

- ``TunevecWorkerLoRAManager`` (vLLM's LRU worker manager, installed by ``install``) owns the worker's
  ``MixtureState``. Its ``_load_adapter`` composes a mixture's slot contents from the vectors' resident factors
  (``compose.compose_mixture``) and hands them to vLLM's own loader, so packing (q/k/v into qkv_proj ...), name
  mapping, slots and the LRU are vLLM's;
- ``GroupedLoRAModelManager`` binds the state to the grouped op (``punica.py``) and tells it when a slot's adapter
  changes;
- on CPU the platform's punica wrapper becomes ``PunicaWrapperGrouped``, and the runner's prompt-logprob path
  routes logits rows per request (``logits.py``).

``TunevecWorkerExtension`` (``--worker-extension-cls``) answers the server's questions over ``collective_rpc``:
which checkpoint tensors the engine's LoRA layers receive (``tunevec_carried``), and what this worker can serve
exactly (``tunevec_capabilities``). A patch that did not take is reported there, and the server refuses what it
guards; nothing falls back to a path known to be wrong.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager, create_lora_manager
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.utils import replace_submodule
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from tunevec.steering.lora import peft_tensors
from tunevec.steering.spec import Spec
from tunevec.steering.vllm.compat import UnverifiedVllm, installed, require
from tunevec.steering.vllm.compose import compose_mixture
from tunevec.steering.vllm.punica import PunicaWrapperGrouped
from tunevec.steering.vllm.state import MIXTURE_PREFIX, DeltaTarget, MixtureState, Target, read_snapshot
from tunevec.steering.vllm.token_deltas import NormWithDeltas, SteeredLayer, norm_kind

logger = logging.getLogger("vllm.tunevec.lora")  # a "vllm." name: vLLM's handler prints it in every process

GROUPED_WRAPPER = "tunevec.steering.vllm.punica.PunicaWrapperGrouped"
RESIDUAL = (
    ".residual.direction"  # tunevec.core.activation.residual_name: a direction added after a decoder layer
)
CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


def install() -> str | None:
    """Route mixtures through in-memory composition and, on CPU, the grouped op and the logits routing.

    Idempotent, called in every vLLM process by the ``tunevec_lora`` plugin. Returns None once installed, else
    why nothing was (the workers report it, and the server refuses mixtures with that reason).
    """
    try:
        build = require("per-request mixtures")
    except UnverifiedVllm as exc:
        logger.warning("tunevec: %s", exc)
        return str(exc)
    from vllm.platforms import current_platform
    from vllm.v1.worker import lora_model_runner_mixin

    if lora_model_runner_mixin.LRUCacheWorkerLoRAManager is not TunevecWorkerLoRAManager:
        lora_model_runner_mixin.LRUCacheWorkerLoRAManager = TunevecWorkerLoRAManager
    if current_platform.is_cpu():
        platform_cls = type(current_platform)
        chosen = platform_cls.get_punica_wrapper()
        if chosen == CPU_WRAPPER:
            platform_cls.get_punica_wrapper = classmethod(lambda cls: GROUPED_WRAPPER)
        elif chosen != GROUPED_WRAPPER:
            logger.error(
                "tunevec: the CPU platform's punica wrapper is %s, not %s: the grouped op is not installed and "
                "per-request mixtures are refused",
                chosen,
                CPU_WRAPPER,
            )
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        from tunevec.steering.vllm.logits import install_prompt_logprob_routing

        problem = install_prompt_logprob_routing(CPUModelRunner, state_of_runner)
        if problem:
            logger.error(
                "tunevec: prompt-logprob rows are not routed per request (%s); mixtures with an output-head delta "
                "are refused",
                problem,
            )
    logger.info("tunevec: in-memory mixtures installed on %s", build)
    return None


def state_of_runner(runner: Any) -> MixtureState | None:
    manager = getattr(runner, "lora_manager", None)
    return manager.state if isinstance(manager, TunevecWorkerLoRAManager) else None


class ModuleMap:
    """Where each checkpoint tensor's delta lands in this engine's LoRA modules, decided as vLLM's loader decides
    it: the tensor's PEFT name parsed with the model's weight mapper into a module name, which must be a
    LoRA-wrapped module or a packed part of one (q_proj of qkv_proj). Anything else vLLM would drop without a word.
    """

    def __init__(self, manager: Any, whole: bool):
        mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
        self._mapper = None if mapper is None else mapper.get_rename_mapper()
        self._model = manager.model
        self._modules = manager.modules
        self._packed = manager.packed_modules
        self._whole = whole  # tensors kept whole can be applied (tunevec's grouped op runs the steps)
        self._targets: dict[str, Target | None] = {}
        self._delta_targets: dict[str, DeltaTarget | None] = {}

    def target(self, tensor: str) -> Target | None:
        """Where a factorised (2-D) tensor's delta lands: a LoRA module, or a slice of a packed one."""
        if tensor not in self._targets:
            self._targets[tensor] = self._find(tensor)
        return self._targets[tensor]

    def delta_target(self, tensor: str) -> DeltaTarget | None:
        """Where a tensor kept whole applies: a norm this engine can move per token (``token_deltas.py``), or the output
        of a LoRA-wrapped linear layer for its bias (not under tensor parallelism, whose shards tunevec does not
        cut biases for)."""
        if tensor not in self._delta_targets:
            self._delta_targets[tensor] = self._find_delta(tensor) if self._whole else None
        return self._delta_targets[tensor]

    def carries(self, tensor: str) -> bool:
        return self.target(tensor) is not None or self.delta_target(tensor) is not None

    def _module_name(self, path: str) -> str:
        """vLLM's name of the module at checkpoint path ``path`` (the model's weight mapper applied)."""
        from vllm.lora.utils import parse_fine_tuned_lora_name

        return parse_fine_tuned_lora_name(f"base_model.model.{path}.lora_A.weight", self._mapper)[0]

    def _find_delta(self, tensor: str) -> DeltaTarget | None:
        from tunevec.core.roles import classify

        path, _, param = tensor.rpartition(".")
        if tensor.endswith(RESIDUAL):  # an activation vector's direction for one decoder layer
            name = self._module_name(tensor.removesuffix(RESIDUAL))
            try:
                module = self._model.get_submodule(name)
            except AttributeError:
                return None
            return DeltaTarget("steer", name, "direction") if isinstance(module, nn.Module) else None
        role = classify(tensor)
        if role.role == "norm":
            name = self._module_name(path)
            try:
                module = self._model.get_submodule(name)
            except AttributeError:
                return None
            base = module.base_layer if isinstance(module, NormWithDeltas) else module
            if norm_kind(base) is None or getattr(base, param, None) is None:
                return None
            return DeltaTarget("norm", name, param)
        if param == "bias" and role.is_linear:
            target = self.target(path + ".weight")
            if target is None or getattr(self._modules[target.module], "tp_size", 1) > 1:
                return None
            return DeltaTarget("bias", target.module, "bias", target)
        return None

    def _find(self, tensor: str) -> Target | None:
        from tunevec.core.roles import classify

        module = self._module_name(tensor.rpartition(".")[0])
        if module not in self._modules and classify(tensor).role == "head" and "lm_head" in self._modules:
            module = "lm_head"  # vLLM's name of the output head whatever the checkpoint calls it (embed_out)
        layer = self._modules.get(module)
        if layer is not None:
            slices = getattr(layer, "output_slices", None)
            rows = sum(slices) if slices else layer.lora_b_stacked.shape[2]
            return Target(module, 0, 0, rows)
        for parent, parts in self._packed.items():
            if module in parts and parent in self._modules:
                sizes = self._modules[parent].output_slices
                i = parts.index(module)
                return Target(parent, i, sum(sizes[:i]), sizes[i])
        return None


class GroupedLoRAModelManager(LRUCacheLoRAModelManager):
    """vLLM's LRU manager that binds the worker's state to its grouped wrappers and tells them when a
    slot's adapter changes."""

    def __init__(self, *args: Any, tunevec_state: MixtureState, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._wrap_embedding_head()
        # The shared stacks hold whole tensors: under tensor parallelism each rank would need its shard, so
        # mixtures are served from their own (sharded) slots there.
        sharded = any(getattr(m, "tp_size", 1) > 1 for m in self.modules.values())
        self.grouped = [
            w for w in self.punica_wrapper_mapping.values() if isinstance(w, PunicaWrapperGrouped)
        ]
        modules = ModuleMap(self, whole=bool(self.grouped))
        plan = (lambda: self.grouped[0]._plan) if self.grouped else None
        tunevec_state.bind_modules(modules.target, not sharded, modules.delta_target, plan)
        for wrapper in self.grouped:
            wrapper.bind(tunevec_state, self.modules)
        if self.grouped:
            tunevec_state.token_slots = lambda: self.grouped[0].token_lora_indices
        # Norms some served vector moves get their per-token deltas (token_deltas.py), as vLLM wraps its LoRA layers.
        moved = {t for entry in tunevec_state.vectors.values() for t in entry.get("deltas", ())}
        for tensor in sorted(moved):
            target = modules.delta_target(tensor)
            if target is None or target.kind not in ("norm", "steer"):
                continue
            module = self.model.get_submodule(target.module)
            if target.kind == "norm" and not isinstance(module, NormWithDeltas):
                wrapped = NormWithDeltas(module, target.module, tunevec_state)
                replace_submodule(self.model, target.module, wrapped)
            elif target.kind == "steer" and not isinstance(module, SteeredLayer):
                replace_submodule(
                    self.model, target.module, SteeredLayer(module, target.module, tunevec_state)
                )

    def _wrap_embedding_head(self) -> None:
        """Give LoRA to the output head of models that compute logits with their input embedding.

        vLLM wraps a model's ``logits_processor`` only beside a module named ``lm_head``. Gemma's models have none:
        ``compute_logits`` passes ``model.embed_tokens`` itself. A tied embedding delta then moved the input
        embedding but not the head, and a Gemma 2 mixture was 0.29 nats per token away from base + tau. Here the
        logits processor of such a model is wrapped as vLLM wraps any other (``LogitsProcessorWithLoRA``), under
        the name ``lm_head``, so the head carries the same factors as the embedding, as it does on tied models
        with an ``lm_head``.
        """
        from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
        from vllm.lora.utils import from_layer_logits_processor
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        if any(name.rpartition(".")[2] == "lm_head" for name in self.modules):
            return
        processor = getattr(self.model, "logits_processor", None)
        config = getattr(self.model, "config", None)
        if (
            processor is None
            or isinstance(processor, LogitsProcessorWithLoRA)
            or hasattr(self.model, "lm_head")
        ):
            return
        if not getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False):
            return
        embeddings = [m for m in self.model.modules() if type(m) is VocabParallelEmbedding]
        if len(embeddings) != 1:
            return
        wrapped = from_layer_logits_processor(
            processor, embeddings[0], self.lora_slots, self.lora_config, config
        )
        replace_submodule(self.model, "logits_processor", wrapped)
        self.register_module("lm_head", wrapped)
        wrapped.set_mapping(
            self._get_punica_wrapper("lm_head") or next(iter(self.punica_wrapper_mapping.values()))
        )

    def activate_adapter(self, lora_id: int) -> bool:
        activated = super().activate_adapter(lora_id)
        if activated:
            slot = self.lora_index_to_id.index(lora_id)
            for wrapper in self.grouped:
                wrapper.invalidate_slot(slot)
        return activated


class TunevecWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    """vLLM's worker LoRA manager, owning the worker's ``MixtureState``; ``tunevec-mixture:`` paths are
    composed in memory, any other path loads as usual."""

    _manager_cls = GroupedLoRAModelManager

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.state = MixtureState(read_snapshot(os.environ), self.lora_config.lora_dtype)

    def create_lora_manager(self, model: torch.nn.Module, vllm_config: Any) -> Any:
        self._adapter_manager = create_lora_manager(
            model,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            vocab_size=self.vocab_size,
            lora_config=self.lora_config,
            device=self.device,
            lora_manager_cls=self._manager_cls,
            vllm_config=vllm_config,
            tunevec_state=self.state,
        )
        return self._adapter_manager.model

    @property
    def grouped(self) -> bool:
        return bool(self._adapter_manager.grouped)

    def _load_adapter(self, lora_request):  # noqa: ANN001, ANN202
        if not lora_request.lora_path.startswith(MIXTURE_PREFIX):
            return super()._load_adapter(lora_request)
        spec = Spec.parse(lora_request.lora_path.removeprefix(MIXTURE_PREFIX))
        model = self._adapter_manager.model
        adapters = self.state.adapters(spec.vectors)
        max_rank = self.lora_config.max_lora_rank
        mixed = compose_mixture(spec, adapters, max_rank=max_rank, fold=not self.grouped)
        if not mixed.factors and not mixed.composition.deltas:
            raise ValueError(f"mixture {spec.canonical()!r} selects no module this engine can adapt")
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        lora = LoRAModel.from_lora_tensors(
            lora_model_id=lora_request.lora_int_id,
            tensors=peft_tensors(mixed.factors),
            # alpha == r: vLLM's scale alpha / r is exactly 1 for every module, whatever its own rank.
            peft_helper=PEFTHelper(r=max_rank, lora_alpha=max_rank, target_modules=[]),
            device="cpu",
            dtype=self.lora_config.lora_dtype,
            model_vocab_size=self.vocab_size,
            weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
            skip_prefixes=getattr(model, "lora_skip_prefixes", None),
        )
        if not lora.loras:
            # Only norms, biases or residual-stream directions: vLLM cannot hold an adapter without LoRA weights,
            # so the slot gets one zero rank-1 module (which the composition does not list: nothing is packed).
            lora = LoRAModel(lora_request.lora_int_id, 1, self._placeholder())
        lora.is_3d_lora_weight = False
        self.state.record(lora_request.lora_int_id, mixed.composition, keep=set(self.list_adapters()))
        return lora

    def _placeholder(self) -> dict[str, Any]:
        """One zero rank-1 LoRA for a single-slice linear module of the engine (``o_proj``, ``down_proj`` ...)."""
        from vllm.lora.lora_weights import LoRALayerWeights

        for name, layer in self._adapter_manager.modules.items():
            base = getattr(layer, "base_layer", None)
            sizes = (getattr(base, "input_size", None), getattr(base, "output_size", None))
            if getattr(layer, "n_slices", 0) == 1 and all(isinstance(n, int) for n in sizes):
                dtype = self.lora_config.lora_dtype
                zero = LoRALayerWeights(
                    name, 1, 1, torch.zeros(1, sizes[0], dtype=dtype), torch.zeros(sizes[1], 1, dtype=dtype)
                )
                return {name: zero}
        raise ValueError("this engine has no single-slice LoRA module to hold a mixture without LoRA weights")


class TunevecWorkerExtension:
    """Mixed into vLLM's worker (``--worker-extension-cls``), reached through ``engine_client.collective_rpc``."""

    def _tunevec_manager(self) -> Any:
        manager = getattr(self.model_runner, "lora_manager", None)
        return manager if isinstance(manager, TunevecWorkerLoRAManager) else None

    def tunevec_carried(self, tensor_names: list[str]) -> list[str]:
        """The checkpoint tensors whose deltas this engine's LoRA modules receive (``ModuleMap``)."""
        manager = self._tunevec_manager()
        if manager is None:
            modules = ModuleMap(self.model_runner.lora_manager._adapter_manager, whole=False)
            return [name for name in tensor_names if modules.carries(name)]
        state = manager.state
        return [n for n in tensor_names if state.target(n) is not None or state.delta_target(n) is not None]

    def tunevec_stats(self) -> dict[str, int]:
        """How the grouped op has served this worker's steps so far (``MixtureState.stats``)."""
        manager = self._tunevec_manager()
        return {} if manager is None else dict(manager.state.stats)

    def tunevec_capabilities(self) -> dict[str, Any]:
        """What this worker can serve exactly: ``mixtures`` and ``head_delta`` are None, or why not."""
        from vllm.config import CompilationMode
        from vllm.platforms import current_platform
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        from tunevec.steering.vllm.logits import routes_prompt_logprobs

        config = self.vllm_config
        manager = self._tunevec_manager()
        mixtures, head = refusals(
            platform=current_platform.device_name,
            installed=None
            if manager is not None
            else (install() or "it was not installed before the engine started"),
            grouped=bool(manager is not None and manager.grouped),
            compiled=config.compilation_config.mode != CompilationMode.NONE,
            fully_sharded=bool(config.lora_config.fully_sharded_loras),
            routed=routes_prompt_logprobs(CPUModelRunner),
        )
        return {
            "build": str(installed()),
            "platform": current_platform.device_name,
            "grouped_op": bool(manager is not None and manager.grouped),
            "lora_dtype": str(config.lora_config.lora_dtype),
            "dtype": str(config.model_config.dtype),
            "mixtures": mixtures,
            "head_delta": head,
        }


def refusals(
    *, platform: str, installed: str | None, grouped: bool, compiled: bool, fully_sharded: bool, routed: bool
) -> tuple[str | None, str | None]:
    """(why no mixture can be served, why no mixture with an output-head delta can be), None where they can.

    ``installed`` is None when tunevec's LoRA manager runs in the worker, else why it does not; ``grouped``:
    tunevec's op is the punica wrapper; ``compiled``: vLLM compiles the model; ``routed``: prompt-logprob logits rows
    are routed per request (the runner patch). Each refusal names the patch or setting that is missing, so that the
    server can say it to the client instead of serving a path known to be wrong.
    """
    cpu = platform == "cpu"
    mixtures = None
    if installed is not None:
        mixtures = f"per-request mixtures are off in this engine: {installed}"
    elif cpu and not grouped:
        mixtures = (
            f"per-request mixtures are off: vLLM's CPU punica wrapper is no longer {CPU_WRAPPER}, so tunevec's "
            "grouped op is not installed"
        )
    elif cpu and compiled:
        mixtures = (
            "per-request mixtures are off: vLLM compiles this model, which would bake the grouped op's per-step "
            "state into the graph"
        )
    elif fully_sharded:
        mixtures = (
            "per-request mixtures are off with --fully-sharded-loras (a path tunevec's op does not serve)"
        )
    if cpu:
        head = (
            None
            if routed
            else "this engine does not route prompt-logprob rows per request (the runner patch did not take)"
        )
    else:
        head = (
            f"on {platform}, vLLM's own LoRA kernels route prompt-logprob rows by the sampled rows, so an output-head "
            "delta (a tied or tuned embedding/head) could be applied to other requests' rows"
        )
    return mixtures, head
