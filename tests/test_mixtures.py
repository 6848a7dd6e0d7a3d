"""Mixtures without an engine: naming, identity, limits, what adapters leave out, and vLLM's registry kept bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from synthetic import llama_like, perturbed, write_model

from tunevec.core.errors import NotFoundError, TunevecError
from tunevec.core.extract import extract
from tunevec.server.config import LoraSettings
from tunevec.server.mixtures import MixtureRegistry, served_name
from tunevec.server.served import EngineLoadError, ServedMixtures
from tunevec.steering.library import VectorLibrary
from tunevec.steering.vllm import MIXTURE_PREFIX


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def vectors_dir(tmp_path) -> Path:
    base = llama_like(0, hidden=16)
    write_model(tmp_path / "b", base)
    for i, name in enumerate(("medical", "math")):
        write_model(tmp_path / name, perturbed(base, seed=3 + i, scale=0.1))
        extract(tmp_path / "b", tmp_path / name, tmp_path / "vectors" / name, progress=False)
    return tmp_path / "vectors"


@pytest.fixture
def registry_factory(vectors_dir, tmp_path):
    def make(**kw) -> MixtureRegistry:
        settings = LoraSettings(**({"max_dropped_share": 1.0} | kw))
        return MixtureRegistry.prepare(
            VectorLibrary.from_dir(vectors_dir), str(tmp_path / "cache"), settings, 2
        )

    return make


def test_equal_specs_share_one_name_and_id_and_nothing_is_written_per_mixture(registry_factory, tmp_path):
    reg = registry_factory(adapter_rank=4, max_lora_rank=8)
    before = files_under(tmp_path / "cache")
    a = reg.mixture(reg.parse("medical:0.5+math"))
    b = reg.mixture(reg.parse("math:1+medical:.5"))
    assert a.name == b.name == "math+medical:0.5" and a.request.lora_int_id == b.request.lora_int_id
    assert a.request.lora_path == MIXTURE_PREFIX + "math+medical:0.5"
    others = {reg.mixture(reg.parse(f"medical:{k / 100}+math")).request.lora_int_id for k in range(51, 90)}
    assert a.request.lora_int_id not in others and len(others) == 39
    assert files_under(tmp_path / "cache") == before  # 40 mixtures, not one byte on disk


def test_a_bare_vector_name_is_served_with_its_coefficient_spelled_out(registry_factory):
    reg = registry_factory()
    assert served_name(reg.parse("medical")) == "medical:1"  # never mistaken for a chat content-part type
    assert served_name(reg.parse("medical@mlp")) == "medical@mlp"


def test_a_re_extracted_vector_gets_new_ids_for_the_same_spec(vectors_dir, tmp_path, registry_factory):
    old = registry_factory().mixture(registry_factory().parse("medical:0.5"))
    base = llama_like(0, hidden=16)
    write_model(tmp_path / "medical2", perturbed(base, seed=99, scale=0.1))
    extract(
        tmp_path / "b",
        tmp_path / "medical2",
        vectors_dir / "medical",
        name="medical",
        force=True,
        progress=False,
    )
    new = registry_factory().mixture(registry_factory().parse("medical:0.5"))
    assert new.name == old.name and new.request.lora_int_id != old.request.lora_int_id


def test_rank_over_the_engine_limit_is_refused_unless_truncation_is_allowed(registry_factory):
    reg = registry_factory(adapter_rank=8, max_lora_rank=8)
    with pytest.raises(TunevecError, match="rank 16, above the server's max LoRA rank 8"):
        reg.mixture(reg.parse("medical+math"))
    reg = registry_factory(adapter_rank=8, max_lora_rank=8, allow_truncation=True)
    mixture = reg.mixture(reg.parse("medical+math"))
    assert mixture.rank == 8 and mixture.truncated


def test_limits_from_the_settings_apply_to_requests(registry_factory):
    reg = registry_factory(max_components=1, max_abs_alpha=1.5)
    with pytest.raises(TunevecError, match="components"):
        reg.parse("medical+math")
    with pytest.raises(TunevecError, match="1.5"):
        reg.parse({"medical": 2})
    with pytest.raises(NotFoundError):
        reg.parse("cardio")


def test_a_vector_an_engine_carries_only_in_part_is_refused_above_the_setting(registry_factory):
    strict = registry_factory(max_dropped_share=0.0)
    assert strict.dropped_share(strict.parse("medical").components[0]) == 0  # norms are carried whole
    strict.restrict_to_engine(
        {m for m in strict.factor_modules() if ".norm" not in m and "layernorm" not in m}
    )
    share = strict.dropped_share(strict.parse("medical").components[0])
    assert 0 < share < 1  # as on an engine that cannot move the fine-tune's norms per request
    with pytest.raises(
        TunevecError,
        match=r"vector 'medical'.*of its \|\|tau\|\|\^2 is not carried per request.*max_dropped_share 0",
    ):
        strict.mixture(strict.parse("medical"))
    strict.mixture(strict.parse("medical@mlp"))  # its MLP part is carried whole
    relaxed = registry_factory(max_dropped_share=share)
    relaxed.restrict_to_engine(
        {m for m in relaxed.factor_modules() if ".norm" not in m and "layernorm" not in m}
    )
    relaxed.mixture(strict.parse("medical"))


def test_nonlinear_merges_are_refused_per_request(registry_factory):
    reg = registry_factory()
    with pytest.raises(TunevecError, match="exact only for linear"):
        reg.mixture(reg.parse("ties(density=0.5)/medical+math"))


# --- vLLM's model registry, without an engine ----------------------------------------------------------------


class FakeModels:
    def __init__(self):
        self.lora_requests: dict = {}


class FakeEngine:
    def __init__(self, fail: set[str] = frozenset()):
        self.loaded: list[str] = []
        self.fail = fail

    async def add_lora(self, request):
        if request.lora_name in self.fail:
            raise ValueError("no such module")
        self.loaded.append(request.lora_name)


def test_registered_names_stay_bounded_and_one_in_flight_is_never_evicted(registry_factory):
    reg = registry_factory()
    models, engine = FakeModels(), FakeEngine()
    served = ServedMixtures(models, engine, capacity=2)
    mixtures = [reg.mixture(reg.parse(f"medical:{k}")) for k in (0.1, 0.2, 0.3, 0.4)]

    async def run():
        await served.acquire(mixtures[0])  # in flight for the whole test
        for m in mixtures[1:]:
            await served.acquire(m)
            served.release(m)
        assert mixtures[0].name in models.lora_requests  # the oldest, but busy
        assert len(models.lora_requests) == 2
        served.release(mixtures[0])
        await served.acquire(mixtures[1])
        served.release(mixtures[1])
        assert mixtures[0].name not in models.lora_requests and len(models.lora_requests) == 2

    asyncio.run(run())
    assert engine.loaded[:4] == [m.name for m in mixtures]


def test_an_engine_refusal_is_reported_and_nothing_is_registered(registry_factory):
    reg = registry_factory()
    mixture = reg.mixture(reg.parse("medical:0.5"))
    models = FakeModels()
    served = ServedMixtures(models, FakeEngine(fail={mixture.name}), capacity=2)
    with pytest.raises(
        EngineLoadError, match="could not load mixture 'medical:0.5'; the server log says why"
    ) as err:
        asyncio.run(served.acquire(mixture))
    assert "no such module" in str(
        err.value.__cause__
    )  # the cause is kept for the log, not sent to the client
    assert models.lora_requests == {}


class FlakyEngine(FakeEngine):
    """Refuses while a vector's factor folder is broken, as a worker reading it would."""

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    async def add_lora(self, request):
        if not all(f.intact() for f in self.registry.vectors.values()):
            raise ValueError("factor cache unreadable")
        await super().add_lora(request)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_factor_folder_broken_after_start_is_rebuilt_and_the_request_served(registry_factory, damage):
    import shutil

    reg = registry_factory()
    folder = Path(reg.vectors["medical"].path)
    if damage == "delete":
        shutil.rmtree(folder)
    else:
        data = folder / "adapter_model.safetensors"
        data.write_bytes(data.read_bytes()[:100])
    models = FakeModels()

    async def repair(mixture):
        return await asyncio.to_thread(reg.repair, mixture.spec.vectors)

    served = ServedMixtures(models, FlakyEngine(reg), capacity=2, repair=repair)
    mixture = reg.mixture(reg.parse("medical:0.5"))
    asyncio.run(served.acquire(mixture))  # no error: rebuilt, then loaded
    assert reg.vectors["medical"].intact() and mixture.name in models.lora_requests


def test_the_lora_metric_keeps_a_bounded_number_of_label_sets():
    from prometheus_client import REGISTRY, Gauge

    from tunevec.steering.vllm import bound_lora_metric_labels

    gauge = REGISTRY._names_to_collectors.get("vllm:lora_requests_info") or Gauge(
        "vllm:lora_requests_info", "test stand-in", labelnames=["running_lora_adapters"]
    )
    for i in range(40):
        gauge.labels(f"mixture-{i}").set_to_current_time()
    bound_lora_metric_labels(16)
    assert len(gauge._metrics) <= 16


def test_modules_the_engine_does_not_adapt_count_as_left_out(registry_factory):
    """vLLM would drop an adapter module it has no LoRA layer for, without a word; the server counts it instead."""
    reg = registry_factory(max_dropped_share=0.01)
    reg.mixture(reg.parse("medical@mlp"))
    mlp = {m for m in reg.factor_modules() if ".mlp." in m}
    reg.restrict_to_engine(mlp)  # as if only the MLP projections were LoRA-wrapped
    assert reg.vectors["medical"].dropped["module"] > 0.3
    reg.mixture(reg.parse("medical@mlp"))  # still whole
    with pytest.raises(
        TunevecError, match=r"medical.*is not carried per request.*\(module\).*max_dropped_share"
    ):
        reg.mixture(reg.parse("medical"))
