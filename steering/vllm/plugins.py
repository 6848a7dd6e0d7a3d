"""tunevec's two vLLM general plugins, each active only when the process asks for it by name in ``VLLM_PLUGINS``.

- ``tunevec_loader``: the injecting model loader (``load_format="tunevec"``, ``loader.py``).
- ``tunevec_lora``: per-request mixtures composed in memory, the grouped LoRA op and the prompt-logprob row
  routing on CPU (``lora_manager.install``).

vLLM runs every installed general plugin when ``VLLM_PLUGINS`` is unset, so a user's own ``vllm serve`` in the
same environment calls these too: they then return without touching anything. ``tunevec serve`` and the servers
``tunevec eval`` starts name the plugins they need (``plugin_env``). Both are idempotent: vLLM calls them in every
process it spawns, sometimes more than once.
"""

from __future__ import annotations

import os

LOADER = "tunevec_loader"
LORA = "tunevec_lora"
LOAD_FORMAT = "tunevec"  # --load-format of the injecting loader
SETTINGS_KEY = "tunevec"  # its settings' key in --model-loader-extra-config


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
    if not requested(LOADER):
        return
    from vllm.model_executor import model_loader

    from tunevec.steering.vllm.loader import InjectingModelLoader

    # vLLM keeps its loaders in a private dict and warns on a second registration: look before registering.
    if getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", {}).get(LOAD_FORMAT) is not InjectingModelLoader:
        model_loader.register_model_loader(LOAD_FORMAT)(InjectingModelLoader)


def register_lora() -> None:
    if not requested(LORA):
        return
    from tunevec.steering.vllm.lora_manager import install

    install()
