"""A planted fault for the differential harness: the worker extension, plus one RPC that spoils a coefficient.

Served only by the harness's own server (``--worker-extension-cls fault_extension.FaultyWorkerExtension`` with
vLLM's dev-mode ``/collective_rpc``); until the RPC is called it behaves exactly as tunevec's extension.
"""

from __future__ import annotations

from dataclasses import replace

from tunevec.steering.vllm.compose import Composition
from tunevec.steering.vllm.lora_manager import TunevecWorkerExtension


class FaultyWorkerExtension(TunevecWorkerExtension):
    def tunevec_plant_fault(self, factor: str) -> str:
        """The next mixture composed in this worker gets its first coefficient times ``factor``."""
        state = self._tunevec_manager().state
        record = state.record

        def spoiled(lora_id: int, composition: Composition, keep: set[int]) -> None:
            tensor, blocks = next(iter(composition.blocks.items()))
            wrong = (replace(blocks[0], coefficient=blocks[0].coefficient * float(factor)), *blocks[1:])
            state.record = record  # once
            record(lora_id, Composition(composition.canonical, {**composition.blocks, tensor: wrong}), keep)

        state.record = spoiled
        return "planted"
