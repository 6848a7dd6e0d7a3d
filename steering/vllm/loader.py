"""A vLLM model loader that injects base + delta(spec) while the engine loads its weights.

Registered as ``load_format="tunevec"`` by the general plugin (``plugins.py``), which vLLM also runs in
its spawned engine processes. Settings travel in ``model_loader_extra_config={"tunevec": {...}}`` as plain data
(spec text and vector paths); every worker rebuilds the same ``Injection`` from them. The loader yields full,
unsharded HF tensors exactly like vLLM's default loader, and vLLM's own weight loaders shard them, so tensor and
pipeline parallelism keep working.
"""

from __future__ import annotations

import copy
from collections.abc import Generator

import torch
from vllm.logger import init_logger
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from tunevec.steering.inject import Injection
from tunevec.steering.vllm.plugins import LOAD_FORMAT, SETTINGS_KEY

# Under vLLM's logger tree so the line appears in the engine processes' output like vLLM's own.
logger = init_logger("vllm.plugins.tunevec.loader")


class InjectingModelLoader(DefaultModelLoader):
    def __init__(self, load_config):
        extra = dict(load_config.model_loader_extra_config or {})
        settings = extra.pop(SETTINGS_KEY, None)
        if settings is None:
            raise ValueError(
                f'load_format="{LOAD_FORMAT}" needs model_loader_extra_config={{"{SETTINGS_KEY}": ...}}'
            )
        # The default loader rejects extra keys it does not know and picks files by load format, so it gets the
        # config without our settings and reads the base as the safetensors checkpoint it is (tunevec vectors
        # are safetensors-only, and so are the bases they are extracted from).
        inner = copy.copy(load_config)
        inner.model_loader_extra_config = extra
        inner.load_format = "safetensors"
        super().__init__(inner)
        self.injection = Injection.from_settings(settings)

    def get_all_weights(self, model_config, model) -> Generator[tuple[str, torch.Tensor], None, None]:
        for name, tensor in super().get_all_weights(model_config, model):
            yield name, self.injection.apply(name, tensor)
        logger.info(
            "tunevec: injected %s into %d tensors",
            self.injection.spec.canonical(),
            len(self.injection.applied),
        )
