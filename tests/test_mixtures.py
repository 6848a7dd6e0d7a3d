"""The mixture registry without an engine: content-addressed adapters, rank limits, LRU eviction."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import llama_like, perturbed, write_model
from tunevec.server.config import ServerConfig
from tunevec.server.mixtures import MixtureRegistry
from tunevec.steering.library import VectorLibrary

from tunevec.core.errors import NotFoundError, TunevecError
from tunevec.core.extract import extract


@pytest.fixture
def registry_factory(tmp_path):
    base = llama_like(0, hidden=16)
    write_model(tmp_path / "b", base)
    for i, name in enumerate(("medical", "math")):
        write_model(tmp_path / name, perturbed(base, seed=3 + i, scale=0.1))
        extract(tmp_path / "b", tmp_path / name, tmp_path / "vectors" / name, progress=False)

    def make(**kw) -> MixtureRegistry:
        cfg = ServerConfig(base=str(tmp_path / "b"), vectors=str(tmp_path / "vectors"), **kw)
        return MixtureRegistry(cfg, VectorLibrary.from_dir(cfg.vectors))

    return make


def test_equal_specs_share_one_adapter_and_id(registry_factory):
    reg = registry_factory(adapter_rank=4, max_lora_rank=8)
    a = asyncio_run(reg.resolve(reg.parse("medical:0.5+math")))
    b = asyncio_run(reg.resolve(reg.parse("math:1+medical:.5")))
    assert a is b and a.request.lora_int_id == reg.parse("medical:0.5+math").int_id()
    c = asyncio_run(reg.resolve(reg.parse("medical:0.25+math")))
    assert c.request.lora_int_id != a.request.lora_int_id and c.request.lora_path != a.request.lora_path


def test_rank_over_the_engine_limit_is_refused_unless_truncation_is_allowed(registry_factory):
    reg = registry_factory(adapter_rank=8, max_lora_rank=8)
    with pytest.raises(TunevecError, match="rank 16, above the server's max LoRA rank 8"):
        asyncio_run(reg.resolve(reg.parse("medical+math")))
    reg = registry_factory(adapter_rank=8, max_lora_rank=8, allow_truncation=True)
    mixture = asyncio_run(reg.resolve(reg.parse("medical+math")))
    assert mixture.rank == 8 and 0 < mixture.max_rel_error < 1


def test_limits_from_the_config_apply_to_requests(registry_factory):
    reg = registry_factory(max_components=1, max_abs_alpha=1.5)
    with pytest.raises(TunevecError, match="components"):
        reg.parse("medical+math")
    with pytest.raises(TunevecError, match="1.5"):
        reg.parse({"medical": 2})
    with pytest.raises(NotFoundError):
        reg.parse("cardio")


def test_least_recently_used_mixtures_are_evicted_and_reported(registry_factory):
    reg = registry_factory(adapter_rank=2, cache_capacity=2)
    evicted = []
    reg._on_evict = evicted.append
    for spec in ("medical", "math", "medical:0.5"):
        asyncio_run(reg.resolve(reg.parse(spec)))
    assert [m.name for m in evicted] == ["medical"]
    assert [m.name for m in reg.loaded()] == ["math", "medical:0.5"]


def test_disk_cache_is_bounded_and_spares_recent_and_registered_mixtures(registry_factory, monkeypatch):
    import os
    import time

    import tunevec.server.mixtures

    reg = registry_factory(adapter_rank=2, cache_capacity=1)
    monkeypatch.setattr(tunevec.server.mixtures, "DISK_FACTOR", 2)  # keep 2 folders on disk
    folders = reg.cache_dir / "mixtures"
    specs = ["medical", "math", "medical:0.5"]
    for spec in specs:
        asyncio_run(reg.resolve(reg.parse(spec)))
    assert len(list(folders.iterdir())) == 3  # over the bound, but every folder was used moments ago

    long_ago = time.time() - 2 * tunevec.server.mixtures.KEEP_RECENT_S
    for age, folder in enumerate(sorted(folders.iterdir())):
        os.utime(folder, (long_ago + age, long_ago + age))
    registered = reg.loaded()[0].request.lora_path
    asyncio_run(reg.resolve(reg.parse("math:0.5")))  # a 4th folder: the two oldest unregistered ones go
    left = {str(p) for p in folders.iterdir()}
    assert len(left) == 2 and registered in left
    # a pruned mixture asked for again is simply rebuilt
    for spec in specs:
        assert Path(asyncio_run(reg.resolve(reg.parse(spec))).request.lora_path).is_dir()


def asyncio_run(coro):
    import asyncio

    return asyncio.run(coro)
