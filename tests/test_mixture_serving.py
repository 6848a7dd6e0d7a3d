"""Per-request mixtures on a real server: no disk, bounded memory, never stale weights (shared batches against
each request alone: tests/test_differential.py).

Each test starts `tunevec serve` on the tiny fixtures, in fp32, over its own copy of the vectors folder (so
re-extracting a vector here cannot disturb other tests).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from servers import mixture_state, reference_prompt_logprobs, running_server, served_prompt_logprobs
from transformers import AutoTokenizer

from tunevec.core.extract import extract

pytestmark = pytest.mark.slow
RANK = 8
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def vectors(tiny_vectors, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vectors")
    for name in ("medical", "math"):
        shutil.copytree(tiny_vectors / name, out / name)
    return out


@pytest.fixture(scope="module")
def server(tiny_fixtures, vectors, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ("--adapter-rank", str(RANK), "--max-lora-rank", "16", "--max-loras", "4", "--max-abs-alpha", "4")
    with running_server(tiny_fixtures / "base", vectors, *args, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def prompts(tiny_fixtures) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_fixtures / "base")
    texts = [
        "The diagnosis typhoid meningitis is coded",
        "Question: What is 12 + 7?\nAnswer:",
        "The brand name",
    ]
    return [tok(t)["input_ids"] for t in texts]


def server_group_rss_kib(url: str) -> int:
    """RSS of every process in the server's process group (API server, engine core, worker)."""
    port = url.rsplit(":", 1)[1]
    pgids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"--port {port}" in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace"
            ):
                pgids.add(os.getpgid(int(proc.name)))
        except (OSError, ProcessLookupError):
            continue
    total = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) not in pgids:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total


def files_under(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def test_fifty_distinct_mixtures_write_nothing_and_keep_memory_flat(server, vectors, prompts):
    for k in range(8):  # warm: slots filled, allocator settled
        assert len(served_prompt_logprobs(server, f"medical:{0.05 * (k + 1):.2f}", prompts[0])) > 0
    disk0, rss0 = files_under(vectors), server_group_rss_kib(server)
    for k in range(50):
        served_prompt_logprobs(server, f"medical:{1 + 0.01 * k:.2f}+math:{-0.5 + 0.01 * k:.2f}", prompts[1])
    disk1, rss1 = files_under(vectors), server_group_rss_kib(server)
    print(f"50 distinct mixtures: RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB ({(rss1 / rss0 - 1):+.2%})")
    assert disk1 == disk0, "a mixture wrote to disk"
    assert rss1 <= 1.05 * rss0


def low_rank_state(base_dir, vectors_dir, spec_text: str) -> dict:
    """What the server serves for ``spec_text`` (rank-RANK factors, norms whole): ``servers.mixture_state``."""
    return mixture_state(base_dir, vectors_dir, spec_text, RANK, 16)


def test_a_vector_re_extracted_under_its_name_is_served_with_its_new_weights(
    tiny_fixtures, tmp_path, prompts
):
    vectors = tmp_path / "vectors"
    extract(tiny_fixtures / "base", tiny_fixtures / "medical", vectors / "medical", progress=False)
    extract(tiny_fixtures / "base", tiny_fixtures / "math", vectors / "math", progress=False)
    spec, ids = "medical:0.5", prompts[0]
    before = reference_prompt_logprobs(
        tiny_fixtures / "base", low_rank_state(tiny_fixtures / "base", vectors, spec), ids
    )
    # "medical" now holds what was the math fine-tune; the factor cache beside it still has the old factors.
    extract(
        tiny_fixtures / "base",
        tiny_fixtures / "math",
        vectors / "medical",
        name="medical",
        force=True,
        progress=False,
    )
    args = ("--adapter-rank", str(RANK), "--max-lora-rank", "16")
    with running_server(tiny_fixtures / "base", vectors, *args, log=tmp_path / "b.log") as url:
        after = served_prompt_logprobs(url, spec, ids)
    want = reference_prompt_logprobs(
        tiny_fixtures / "base", low_rank_state(tiny_fixtures / "base", vectors, spec), ids
    )
    assert max(abs(a - b) for a, b in zip(after, want, strict=True)) < TOLERANCE
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 0.05
