"""Shared test set-up: everything offline, and the tiny model fixtures built once and cached on disk.

The environment variables are set at import, before any test module imports transformers, datasets or lm-eval,
because those libraries read them when first imported.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


# Modules whose module-scoped server is parametrised: each parameter is a server of its own, so its tests form a
# group of their own and the two xdist workers can share the module's servers out between them.
SPLIT_BY_PARAM = {"test_architectures": "family", "test_differential": "served"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs on two xdist workers with ``--dist loadgroup``: a group's tests run in one worker, so the
    server a module starts once is started once. Slow groups (real servers) are put first, so the two workers are
    busy with the long ones while the quick unit tests fill the end."""
    for item in items:
        group = item.module.__name__
        param = SPLIT_BY_PARAM.get(group)
        callspec = getattr(item, "callspec", None)
        if param and callspec is not None and param in callspec.params:
            group += f"[{callspec.params[param]}]"
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def artifacts_dir() -> Path:
    """Where test builds go: $TUNEVEC_TEST_ARTIFACTS, else <repo>/artifacts/test (git-ignored)."""
    return Path(os.environ.get("TUNEVEC_TEST_ARTIFACTS", REPO_ROOT / "artifacts" / "test"))


@pytest.fixture(scope="session")
def tiny_fixtures() -> Path:
    """The kind=tiny fixtures (seed 0): base/, medical/, math/, tasks/, probe.jsonl, fixtures.json.

    Built on first use (81 s measured on 2 idle cores; 4-15 minutes were measured on a busy shared
    machine) and reused across runs through the content key.
    """
    from tunevec.fixtures import build_fixtures

    return build_fixtures("tiny", artifacts_dir() / "fixtures-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_vectors(tiny_fixtures: Path) -> Path:
    """A vectors folder with `medical/` and `math/` extracted from the tiny fixtures (re-extracted if stale)."""
    return extracted_vectors(tiny_fixtures, artifacts_dir() / "vectors-tiny")


@pytest.fixture(scope="session")
def smol_fixtures() -> Path:
    """The kind=smol fixtures (SmolLM2-135M-Instruct and its medical and math fine-tunes, seed 0).

    Built on first use (173 s measured on 2 idle cores, 31 minutes on a machine shared with 4 other jobs) and reused
    through the content key.
    """
    from tunevec.fixtures import build_fixtures

    return build_fixtures("smol", artifacts_dir() / "fixtures-smol", seed=0)


@pytest.fixture(scope="session")
def smol_vectors(smol_fixtures: Path) -> Path:
    return extracted_vectors(smol_fixtures, artifacts_dir() / "vectors-smol")


def extracted_vectors(fixtures: Path, out: Path) -> Path:
    """`out` with `medical/` and `math/` extracted from ``fixtures``, re-extracted when built from another base."""
    from tunevec.core.checkpoint import Checkpoint
    from tunevec.core.errors import TunevecError
    from tunevec.core.extract import extract
    from tunevec.core.vector import TuningVector

    base = Checkpoint(fixtures / "base")
    for name in ("medical", "math"):
        try:
            current = TuningVector(out / name).manifest.base.get("fingerprint") == base.fingerprint()
        except TunevecError:
            current = False
        if not current:
            extract(fixtures / "base", fixtures / name, out / name, name=name, force=True, progress=False)
    return out
