"""The API-server side of the boundary: the names tunevec writes into vLLM's OpenAI serving state.

vLLM's OpenAI handlers serve a LoRA request for a ``model`` name found in ``OpenAIServingModels.lora_requests``.
vLLM fills that map through ``/v1/load_lora_adapter`` or its resolver plugins, both tied to
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which would also let any client load adapters from arbitrary paths; tunevec
writes the map itself (``server/served.py`` decides when), through ``lora_registry`` only.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.lora.request import LoRARequest

from tunevec.steering.vllm.compat import require
from tunevec.steering.vllm.state import MIXTURE_PREFIX

logger = logging.getLogger("tunevec.server")


def mixture_request(name: str, lora_id: int, canonical: str) -> LoRARequest:
    """The ``LoRARequest`` that names a mixture to the engine: its path is ``tunevec-mixture:<canonical spec>``,
    which the workers compose in memory (nothing is read from or written to that path)."""
    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=MIXTURE_PREFIX + canonical)


def lora_registry(serving_models: Any) -> dict:
    """vLLM's name -> ``LoRARequest`` map (``OpenAIServingModels.lora_requests``), on a verified build only."""
    require("registering mixtures in vLLM's model list")
    registry = getattr(serving_models, "lora_requests", None)
    if not isinstance(registry, dict):
        raise RuntimeError(
            f"OpenAIServingModels.lora_requests is a {type(registry).__name__}, not the dict tunevec registers "
            "mixtures in"
        )
    return registry


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
