"""Extraction throughput against simply reading both checkpoints once with safetensors, on 7B-shaped tensors.

    .venv/bin/python bench/bench_extract.py                    # 4 layers, ~2.1 GB per bf16 checkpoint
    .venv/bin/python bench/bench_extract.py --layers 2 --repeats 1 --dir /tmp/tvbench

The generated pair has Llama-2-7B shapes: per layer q/k/v/o 4096×4096 and gate/up 11008×4096, down 4096×11008,
two RMSNorm weights; an embedding and an untied head of 32000×4096; stored in bf16 (as 7B checkpoints are), one
shard per layer as HF writes them. The tuned model is the base plus small Gaussian noise. Generated once and
reused (``--dir``); ``--clean`` removes it afterwards.

Each measurement runs in a fresh Python process (peak RSS = its VmHWM), rows alternate within every round, and
the median over ``--repeats`` rounds is reported, with the inputs' page cache either cold (evicted with
posix_fadvise DONTNEED before the row: the disk-bound case of a real 7B checkpoint) or warm (read just before):
  read       safetensors ``safe_open(...).get_tensor`` of every tensor of both checkpoints (the floor: the bytes
             extraction must read at least once); it reads files directly on purpose — it is the reference
  extract    ``tunevec.core.vector.extract`` to bf16 τ (the default for a bf16 pair) and to fp32 τ, end to end (plan, read, subtract,
             sha256, write, fsync, manifest); ``extract-bf16-tmpfs`` writes τ to /dev/shm (memory) instead of
             the disk, to separate the cost of writing the artifact from reading and computing
Throughput is input bytes (both checkpoints) per second; ratio = read time / extract time (1 = as fast as
reading). Target: ratio ≥ 0.8. Earlier outputs are deleted before each extract row, outside its time. A last
section times the steps of extraction's inner loop on one layer, to show where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET = 0.8
SHM = "/dev/shm/tunevec-bench-extract"  # tmpfs: the extract-*-tmpfs rows write τ to memory, not disk
HIDDEN, INTER, VOCAB = 4096, 11008, 32000


def layer_shapes(i: int) -> dict[str, tuple[int, int] | tuple[int]]:
    p = f"model.layers.{i}."
    return {
        **{p + f"self_attn.{m}.weight": (HIDDEN, HIDDEN) for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
    }


def generate(root: Path, layers: int, seed: int = 0) -> None:
    """Write base/ and tuned/ (sharded bf16 safetensors + index + config), one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    marker = root / f"generated-{layers}.json"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    shards = [{"model.embed_tokens.weight": (VOCAB, HIDDEN)}] + [layer_shapes(i) for i in range(layers)]
    shards[-1] = {**shards[-1], "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    g = torch.Generator().manual_seed(seed)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    for side in ("base", "tuned"):
        (root / side).mkdir(parents=True)
        (root / side / "config.json").write_text(json.dumps(cfg))
    weight_map = {}
    t0 = time.perf_counter()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        base, tuned = {}, {}
        for name, shape in shard.items():
            w = torch.randn(shape, generator=g) * 0.02
            if len(shape) == 1:
                w += 1.0
            base[name] = w.bfloat16()
            tuned[name] = (w + 0.002 * torch.randn(shape, generator=g)).bfloat16()
            weight_map[name] = fname
            del w
        save_file(base, root / "base" / fname)
        save_file(tuned, root / "tuned" / fname)
        del base, tuned
        print(f"  generated shard {k + 1}/{len(shards)}", flush=True)
    for side in ("base", "tuned"):
        (root / side / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    marker.write_text(json.dumps({"layers": layers, "seconds": round(time.perf_counter() - t0, 1)}))


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (posix_fadvise DONTNEED; no privileges needed for clean pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_mib() -> float:
    """VmHWM of this process: unlike ru_maxrss it does not inherit the parent's high-water mark across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, root: Path) -> None:
    """One measurement in this (fresh) process; prints a JSON line with seconds and peak RSS."""
    # Imports stay outside the timed region for every row.
    from safetensors import safe_open

    from tunevec.core.extract import extract

    t0 = time.perf_counter()
    if kind == "read":
        nbytes = 0
        for side in ("base", "tuned"):
            for f in sorted((root / side).glob("*.safetensors")):
                with safe_open(f, framework="pt") as st:
                    for name in st.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                        # get_tensor is lazy (memory-mapped) in safetensors >= 0.6: clone materialises the bytes.
                        t = st.get_tensor(name).clone()
                        nbytes += t.numel() * t.element_size()
                        del t
    else:
        dtype = "float32" if kind.startswith("extract-f32") else "bfloat16"
        where = Path(SHM) if kind.endswith("-tmpfs") else root
        vec = extract(root / "base", root / "tuned", where / f"tau-{dtype}", dtype=dtype, progress=False)
    seconds = time.perf_counter() - t0
    rounding = vec.manifest.policies.get("rounding") if kind != "read" else None
    print(
        json.dumps({"kind": kind, "seconds": seconds, "peak_rss_mib": peak_rss_mib(), "rounding": rounding})
    )


def run_child(kind: str, root: Path, cold: bool) -> dict:
    for out in [*root.glob("tau-*"), *Path(SHM).glob("tau-*")]:  # earlier outputs, removed outside the timing
        shutil.rmtree(out)
    if cold:
        evict([f for side in ("base", "tuned") for f in (root / side).glob("*.safetensors")])
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--dir", str(root)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def phase_breakdown(root: Path) -> dict[str, float]:
    """Seconds per step of extraction's inner loop for one decoder layer (7 matrices), to show where time goes.

    Mirrors tunevec.core.vector.extract's per-tensor work with bf16 output (the default for a bf16 pair): read both
    into reused fp32 buffers, subtract in place, norms, cast to bf16 and measure the rounding, sha256, write;
    diagnosis only (sequential, where extract overlaps hashing and writing with the next tensor's compute).
    """
    import hashlib

    import torch

    from tunevec.core.checkpoint import Checkpoint

    base, tuned = Checkpoint(root / "base"), Checkpoint(root / "tuned")
    names = [n for n in base.names() if ".layers.0." in n]
    steps: dict[str, float] = {}

    def lap(step: str, t0: float) -> float:
        steps[step] = steps.get(step, 0.0) + time.perf_counter() - t0
        return time.perf_counter()

    biggest = max(base.tensors[n].nbytes for n in names) // 2
    bufs = [torch.empty(biggest, dtype=torch.float32) for _ in range(2)]
    out_buf = torch.empty(biggest, dtype=torch.bfloat16)
    sink = root / "phase.bin"
    with sink.open("wb") as f:
        for name in names:
            shape = base.tensors[name].shape
            numel = base.tensors[name].nbytes // 2
            w_base, w_tuned = (b[:numel].view(shape) for b in bufs)
            t0 = time.perf_counter()
            raw = base.read(name).clone()
            t0 = lap("read bf16 (reference)", t0)
            base.read_into(name, w_base)
            tuned.read_into(name, w_tuned)
            t0 = lap("read into fp32, both", t0)
            tau = w_tuned.sub_(w_base)
            t0 = lap("subtract", t0)
            float(tau.norm()), float(w_base.norm())
            t0 = lap("norms", t0)
            stored = out_buf[:numel].view(shape).copy_(tau)
            t0 = lap("cast to bf16", t0)
            err = w_base.copy_(stored).sub_(tau)
            int(torch.count_nonzero(err))
            t0 = lap("rounding check", t0)
            data = memoryview(stored.reshape(-1).view(torch.uint8).numpy())
            hashlib.sha256(data).hexdigest()
            t0 = lap("sha256 (bf16)", t0)
            f.write(data)
            t0 = lap("write (bf16)", t0)
            del raw, data
        f.flush()
        t0 = time.perf_counter()
        os.fsync(f.fileno())
        lap("fsync", t0)
    sink.unlink()
    return steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/tunevec-bench-extract", help="where the generated pair lives")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cache", choices=["cold", "warm", "both"], default="both", help="page-cache state of inputs"
    )
    ap.add_argument("--clean", action="store_true", help="delete the generated pair and outputs at the end")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    if args.child:
        child(args.child, root)
        return 0

    print(
        f"generating a {args.layers}-layer 7B-shaped bf16 pair in {root} (reused if present) ...", flush=True
    )
    generate(root, args.layers)
    in_bytes = sum(
        f.stat().st_size for side in ("base", "tuned") for f in (root / side).glob("*.safetensors")
    )
    print(f"input: {in_bytes / 1e9:.2f} GB (both checkpoints), {os.cpu_count()} CPUs", flush=True)
    kinds = ["read", "extract-bf16", "extract-f32"]
    if Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 2 * in_bytes:
        Path(SHM).mkdir(exist_ok=True)
        kinds.append(
            "extract-bf16-tmpfs"
        )  # same work, output on tmpfs: separates the disk write from the rest
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    results: dict[tuple[str, str], list[dict]] = {(c, k): [] for c in caches for k in kinds}
    for r in range(args.repeats):
        for cache in caches:
            if cache == "warm":
                run_child("read", root, cold=False)  # bring the inputs into the page cache
            for kind in kinds:
                res = run_child(kind, root, cold=cache == "cold")
                results[(cache, kind)].append(res)
                print(
                    f"  round {r + 1} {cache}: {kind:18s} {res['seconds']:7.2f} s  peak RSS {res['peak_rss_mib']:6.0f} MiB",
                    flush=True,
                )

    print()
    print(f"{'cache':6s} {'row':18s} {'median s':>9s} {'GB/s in':>8s} {'ratio':>6s} {'peak RSS MiB':>13s}")
    verdicts = []
    for cache in caches:
        read_s = statistics.median(x["seconds"] for x in results[(cache, "read")])
        for kind in kinds:
            secs = statistics.median(x["seconds"] for x in results[(cache, kind)])
            rss = max(x["peak_rss_mib"] for x in results[(cache, kind)])
            ratio = read_s / secs
            if kind != "read":
                verdicts.append(f"{cache} {kind} {ratio:.2f} {'met' if ratio >= TARGET else 'NOT met'}")
            print(f"{cache:6s} {kind:18s} {secs:9.2f} {in_bytes / secs / 1e9:8.2f} {ratio:6.2f} {rss:13.0f}")
    print(
        f"\ntarget ratio >= {TARGET} (read time / extract time, medians of {args.repeats}): "
        + "; ".join(verdicts)
    )
    rounded = next((x["rounding"] for x in results[(caches[0], "extract-bf16")] if x.get("rounding")), None)
    if rounded:
        print(
            f"bf16 tau (the default for this bf16 pair): {rounded['entries_rounded']:,} of {rounded['entries']:,} "
            f"entries rounded, relative error {rounded['relative_error']:.2e}, max |error| {rounded['max_abs_error']:.2e}"
        )
    steps = phase_breakdown(root)
    total = sum(steps.values()) - steps["read bf16 (reference)"]
    print(
        f"\nwhere extraction time goes, one decoder layer (warm cache; {total:.2f} s without the reference read):"
    )
    for step, secs in steps.items():
        print(f"  {step:28s} {secs:6.2f} s")
    shutil.rmtree(SHM, ignore_errors=True)
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(v.endswith(" met") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
