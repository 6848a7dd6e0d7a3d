"""The mixtures registered with vLLM: when a served name is added to vLLM's model registry, and when it leaves.

A mixture is registered on first use, after the engine has loaded it (``engine_client.add_lora``, which validates
it in the workers); the registry (``tunevec.steering.vllm.lora_registry``) stays bounded: at most ``capacity``
names, least recently used first, never one with a request in flight (a name evicted between the middleware's
rewrite and vLLM's model check would turn a valid request into a 404).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from tunevec.core.errors import TunevecError
from tunevec.steering.vllm import bound_lora_metric_labels, lora_registry

logger = logging.getLogger("tunevec.server")


class EngineLoadError(TunevecError):
    """The engine refused a mixture the server had accepted (a server-side fault: answered with a 500)."""


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
