"""A vLLM model loader that injects base + delta(spec) while the engine loads its weights.

Registered as ``load_format="tunevec"`` by the general plugin (``steering.vllm_plugin``), which vLLM also runs in
its spawned engine processes. Settings travel in ``model_loader_extra_config={"tunevec": {...}}`` as plain data
(spec text and vector paths); every worker rebuilds the same ``Injection`` from them. The loader yields full,
unsharded HF tensors exactly like vLLM's default loader, and vLLM's own weight loaders shard them, so tensor and
pipeline parallelism keep working.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Generator

import torch
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from steering.inject import Injection

logger = logging.getLogger("tunevec.loader")
LOAD_FORMAT = "tunevec"
SETTINGS_KEY = "tunevec"


class InjectingModelLoader(DefaultModelLoader):
    def __init__(self, load_config):
        extra = dict(load_config.model_loader_extra_config or {})
        settings = extra.pop(SETTINGS_KEY, None)
        if settings is None:
            raise ValueError(
                f'load_format="{LOAD_FORMAT}" needs model_loader_extra_config={{"{SETTINGS_KEY}": ...}}'
            )
        # The default loader rejects keys it does not know, so it gets the config without ours.
        inner = copy.copy(load_config)
        inner.model_loader_extra_config = extra
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
