"""The mixtures registered in vLLM's model registry: the one place tunevec writes to vLLM's serving state.

vLLM's OpenAI handlers serve a LoRA request for a ``model`` name found in ``OpenAIServingModels.lora_requests``.
vLLM fills that map through ``/v1/load_lora_adapter`` or its resolver plugins, both tied to
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which would also let any client load adapters from arbitrary paths. tunevec
therefore writes the map itself, here only, after the engine has loaded the adapter (``engine_client.add_lora``,
which validates it in the workers), and keeps it bounded: at most ``capacity`` names, least recently used first,
never one with a request in flight (a name evicted between the middleware's rewrite and vLLM's model check would
turn a valid request into a 404).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from tunevec.core.errors import TunevecError

logger = logging.getLogger("tunevec.server")
VERIFIED_VLLM_VERSIONS = frozenset({"0.32.0"})


class EngineLoadError(TunevecError):
    """The engine refused a mixture the server had accepted (a server-side fault: answered with a 500)."""


def lora_registry(serving_models: Any) -> dict:
    """vLLM's name -> ``LoRARequest`` map (``OpenAIServingModels.lora_requests``), checked for this vLLM version."""
    import vllm

    version = vllm.__version__.split("+")[0]
    registry = getattr(serving_models, "lora_requests", None)
    if version not in VERIFIED_VLLM_VERSIONS or not isinstance(registry, dict):
        raise RuntimeError(
            f"tunevec registers mixtures in OpenAIServingModels.lora_requests, verified on vLLM "
            f"{sorted(VERIFIED_VLLM_VERSIONS)}; this is vLLM {vllm.__version__} (found {type(registry).__name__})"
        )
    return registry


class ServedMixtures:
    """Registers mixtures with the engine on first use and keeps vLLM's model registry bounded."""

    def __init__(
        self,
        serving_models: Any,
        engine_client: Any,
        capacity: int,
        repair: Callable[[Any], Awaitable[bool]] | None = None,
    ):
        self._names = lora_registry(serving_models)
        self._engine = engine_client
        self.capacity = capacity
        # Called when the engine refuses a mixture: rebuilds what on-disk state it can (a factor folder deleted or
        # damaged since start-up) and says whether retrying may help. No file state may wedge a spec.
        self._repair = repair
        self._lock = asyncio.Lock()
        self._registered: OrderedDict[str, Any] = OrderedDict()  # served name -> Mixture, LRU order
        self._in_flight: dict[str, int] = {}

    async def acquire(self, mixture: Any) -> None:
        """Make ``mixture`` servable for one request; pair every call with ``release``."""
        name = mixture.name
        async with self._lock:
            if name not in self._registered:
                await self._load(mixture)
                self._names[name] = mixture.request
                self._registered[name] = mixture
                bound_lora_metric_labels(2 * self.capacity)
            self._registered.move_to_end(name)
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
            self._evict()

    async def _load(self, mixture: Any) -> None:
        try:
            await self._engine.add_lora(mixture.request)
            return
        except Exception as exc:
            first = exc
        if self._repair is not None and await self._repair(mixture):
            try:
                await self._engine.add_lora(mixture.request)
                logger.warning(
                    "tunevec: mixture %s loaded after its factor folders were rebuilt", mixture.name
                )
                return
            except Exception as exc:
                first = exc
        # The cause can name server paths (a factor folder): it goes to the log, not to the client.
        logger.error("tunevec: the engine could not load mixture %s: %s", mixture.name, first)
        raise EngineLoadError(
            f"the engine could not load mixture {mixture.name!r}; the server log says why"
        ) from first

    def release(self, mixture: Any) -> None:
        left = self._in_flight.get(mixture.name, 0) - 1
        if left > 0:
            self._in_flight[mixture.name] = left
        else:
            self._in_flight.pop(mixture.name, None)

    def _evict(self) -> None:
        excess = len(self._registered) - self.capacity
        for name in list(self._registered):
            if excess <= 0:
                break
            if name in self._in_flight:
                continue  # over capacity for as long as the busy ones run
            del self._registered[name]
            self._names.pop(name, None)
            excess -= 1

    def registered(self) -> list[str]:
        return list(self._registered)


def bound_lora_metric_labels(limit: int) -> None:
    """Keep vLLM's ``vllm:lora_requests_info`` gauge from growing with every mixture name ever served.

    vLLM labels that gauge with the running and waiting adapters' names, one label set per combination, and the
    Prometheus client keeps every label set forever: with per-request mixtures that is unbounded. Past ``limit``
    sets the gauge is cleared; vLLM sets the current one again at its next step (it only records the time).
    """
    try:
        from prometheus_client import REGISTRY

        gauge = REGISTRY._names_to_collectors.get("vllm:lora_requests_info")
        if gauge is not None and len(getattr(gauge, "_metrics", ())) > limit:
            gauge.clear()
    except Exception:  # metrics are best effort; serving must not depend on the client's internals
        logger.debug("tunevec: could not bound the LoRA metric labels", exc_info=True)
