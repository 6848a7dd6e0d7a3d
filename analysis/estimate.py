"""What a run of ``extract``, ``analyze`` or ``attribute`` will cost, known before it is paid.

The work of each stage is counted from what is known before any tensor is read (tensor shapes from the
safetensors headers, the vector manifests, the settings, the tokenised probe texts and examples); time is that work
divided by measured throughputs (``analysis/costs.py``), memory is a sum of the buffers the stage holds at its
peak. Each command prints its estimate first and refuses to start when the peak exceeds the memory it may use
(``--max-memory``, else what the device reports free), naming what would make it fit. The formulas, and how the
estimates compare with measured runs, are in docs/scaling.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from tunevec.analysis import costs
from tunevec.analysis.device import available_memory, describe
from tunevec.analysis.options import format_size
from tunevec.core.checkpoint import Checkpoint, TensorInfo
from tunevec.core.errors import TunevecError
from tunevec.core.roles import classify

LINEAR = ("attention", "mlp")
N_ITER, OVERSAMPLE = 4, 10  # randomized_svd's settings (tunevec.core.linalg)


@dataclass
class Stage:
    """One stage's predicted seconds and peak memory (device; host too when the device is a GPU)."""

    name: str
    work: dict[str, float]  # kind (see analysis/costs.py) -> amount
    device_bytes: int
    host_bytes: int
    parts: dict[str, int] = field(default_factory=dict)  # what the device peak is made of
    seconds: float = 0.0
    details: dict[str, float] = field(
        default_factory=dict
    )  # counts behind the work (for bench/bench_scaling.py)


@dataclass
class Estimate:
    command: str
    device: torch.device
    stages: list[Stage]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def device_bytes(self) -> int:
        return max(s.device_bytes for s in self.stages)

    @property
    def host_bytes(self) -> int:
        return max(s.host_bytes for s in self.stages)

    def lines(self) -> list[str]:
        where = describe(self.device)
        head = (
            f"estimate for {self.command} on {where}: {_duration(self.seconds)}, peak memory "
            f"{format_size(self.device_bytes)}"
            + (
                ""
                if self.device.type == "cpu"
                else f" on the GPU, {format_size(self.host_bytes)} on the host"
            )
        )
        measured = costs.CUDA_MEASURED if self.device.type == "cuda" else costs.CPU_MEASURED
        out = [head, f"  (throughputs measured {measured}; a guide to within about 2x, docs/scaling.md)"]
        for s in self.stages:
            parts = ", ".join(f"{k} {format_size(v)}" for k, v in s.parts.items() if v >= 2**20)
            out.append(
                f"  {s.name}: {_duration(s.seconds)}, {format_size(s.device_bytes)}"
                + (f" ({parts})" if parts else "")
            )
        return out

    def as_dict(self) -> dict:
        return {
            "command": self.command,
            "device": str(self.device),
            "seconds": self.seconds,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "stages": {
                s.name: {
                    "seconds": s.seconds,
                    "device_bytes": s.device_bytes,
                    "host_bytes": s.host_bytes,
                    "work": s.work,
                    "parts": s.parts,
                    "details": s.details,
                }
                for s in self.stages
            },
        }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def rates(device: torch.device) -> dict[str, float]:
    """Throughputs for ``device``: the measured table, CPU compute rates scaled to this process's threads."""
    if device.type == "cuda":
        return dict(costs.RATES["cuda"])
    scale = torch.get_num_threads() / costs.CPU_THREADS
    return {k: v * (1.0 if k in costs.IO_KINDS else scale) for k, v in costs.RATES["cpu"].items()}


def _finish(command: str, device: torch.device, stages: list[Stage]) -> Estimate:
    r = rates(device)
    for s in stages:
        s.seconds = sum(amount / r[kind] for kind, amount in s.work.items())
        if device.type == "cpu":  # the tensors share the host's memory with the process itself
            s.host_bytes = s.device_bytes = costs.HOST_BASELINE["cpu"] + s.device_bytes
    return Estimate(command, device, stages)


# ----------------------------------------------------------------------------- shapes and flops


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _itemsize(info: TensorInfo) -> int:
    return info.nbytes // max(1, _numel(info.shape))


def _bytes(ckpt: Checkpoint, name: str) -> int:
    return _itemsize(ckpt.tensors[name])


def _vector_itemsize(vector) -> int:
    from tunevec.core.vector import DTYPES

    return DTYPES[vector.manifest.dtype].itemsize


def randomized_svd_flops(m: int, n: int, rank: int) -> float:
    """Flops of ``randomized_svd`` (sketch q = rank + 10, 4 power iterations re-orthonormalised by QR)."""
    q = min(rank + OVERSAMPLE, m, n)
    return 2.0 * m * n * q * (2 + 2 * N_ITER) + 4.0 * (m + n) * q * q * (1 + N_ITER)


def full_svd_flops(m: int, n: int, vectors: bool) -> float:
    """Flops of an exact thin SVD (Golub & Van Loan's counts for the R-SVD)."""
    big, small = max(m, n), min(m, n)
    return 4.0 * big * small**2 + (22.0 * small**3 if vectors else -4.0 * small**3 / 3)


@dataclass(frozen=True)
class ModelShape:
    """What a cost estimate needs of a model, read from its checkpoint's headers and config."""

    params: int  # every tensor, a tied head counted once
    layer_params: tuple[int, ...]  # per decoder layer
    hidden: int
    vocab: int
    intermediate: int
    heads: int
    largest: int  # entries of the largest tensor
    largest_linear: int
    dtype_bytes: int  # bytes per entry of the checkpoint's weights (the widest)
    bytes: int  # of the whole checkpoint

    @classmethod
    def of(cls, ckpt: Checkpoint) -> ModelShape:
        return cls.from_shapes(
            {n: tuple(i.shape) for n, i in ckpt.tensors.items()},
            ckpt.config,
            ckpt.architecture,
            max((_itemsize(i) for i in ckpt.tensors.values()), default=4),
        )

    @classmethod
    def from_shapes(
        cls, shapes: dict[str, tuple[int, ...]], config: dict, architecture: str | None, itemsize: int
    ) -> ModelShape:
        """From tensor shapes and a config.json dict (a checkpoint's, or a model never written, for predictions)."""
        cfg = config.get("text_config", config)
        n_layers = int(cfg.get("num_hidden_layers") or 0)
        per_layer = [0] * n_layers
        largest = largest_linear = 0
        hidden = vocab = 0
        for name, dims in shapes.items():
            role = classify(name, architecture)
            n = _numel(dims)
            largest = max(largest, n)
            if role.role in LINEAR and role.is_linear:
                largest_linear = max(largest_linear, n)
            if role.layer is not None and role.layer < n_layers:
                per_layer[role.layer] += n
            if role.role == "embedding" and len(dims) == 2:
                vocab, hidden = dims
        params = sum(_numel(d) for d in shapes.values())
        return cls(
            params=params,
            layer_params=tuple(per_layer),
            hidden=int(cfg.get("hidden_size") or hidden),
            vocab=int(cfg.get("vocab_size") or vocab),
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
            heads=int(cfg.get("num_attention_heads") or 1),
            largest=largest,
            largest_linear=largest_linear,
            dtype_bytes=itemsize,
            bytes=params * itemsize,
        )

    def forward_flops(
        self, tokens: float, length: float, layers: Iterable[int] | None = None, head_tokens=None
    ) -> float:
        """2 · parameters · tokens over ``layers`` (default all), attention scores and values (4 · length · d per
        token and layer), and the LM head at ``head_tokens`` positions (default every token)."""
        chosen = range(len(self.layer_params)) if layers is None else list(layers)
        body = sum(2.0 * self.layer_params[i] * tokens + 4.0 * tokens * length * self.hidden for i in chosen)
        head = 2.0 * self.hidden * self.vocab * (tokens if head_tokens is None else head_tokens)
        return body + head

    def activation_bytes(self, tokens: float, length: float) -> float:
        """fp32 activations one decoder layer keeps for backward, per batch of ``tokens``: the inputs of its linears
        and norms, q, k, v before and after rotation, the MLP's hidden (gate, up, activation, product) and the
        attention weights. 12·d + 6·ffn + 2·heads·length floats per token: calibrated on a 7B pair, where the
        attribution's peak was 67.5 GiB measured and 68 GiB estimated (docs/scaling.md)."""
        per_token = 12 * self.hidden + 6 * self.intermediate + 2 * self.heads * length
        return 4.0 * tokens * per_token


# ----------------------------------------------------------------------------- extract


def estimate_extract(base: Checkpoint, tuned: Checkpoint, dtype: str, device: torch.device) -> Estimate:
    """``tunevec extract`` of this pair; ``dtype`` is the stored τ's (``auto``: at most the checkpoints' widest)."""
    from tunevec.core.vector import DTYPES

    shape = ModelShape.of(base)
    out = shape.dtype_bytes if dtype == "auto" else DTYPES[dtype].itemsize
    return extract_cost(shape, ModelShape.of(tuned).bytes, out, device)


def extract_cost(shape: ModelShape, tuned_bytes: int, out_itemsize: int, device: torch.device) -> Estimate:
    """One pass over both checkpoints; memory bounded by the largest tensor (``tunevec.core.extract``'s buffers)."""
    t, b_in = shape.largest, shape.dtype_bytes
    moved = float(shape.bytes + tuned_bytes)
    host_base = costs.HOST_BASELINE[device.type]
    if device.type == "cpu":
        buffers = t * (4 + (8 if out_itemsize == 4 else 4 + 2 * out_itemsize) + b_in)
        stage = Stage(
            "extract", {"extract": moved}, buffers, host_base + buffers, {"tensor buffers": buffers}
        )
    else:
        # the float32 pair, the rounding check's error (float32), the stored τ and the two tensors in transit
        on_device = t * (12 + out_itemsize + 2 * b_in)
        host = host_base + t * (3 * b_in + 2 * out_itemsize)
        stage = Stage("extract", {"extract": moved}, on_device, host, {"tensor buffers": on_device})
    return _finish("extract", device, [stage])


# ----------------------------------------------------------------------------- analyze


@dataclass(frozen=True)
class ProbeWork:
    """The probe's size, known once its texts are tokenised (``analysis/probe.py:probe_work``)."""

    texts: int
    tokens: int  # non-pad tokens run
    padded_tokens: int  # positions run, padding included
    kept_tokens: int  # token rows stored per layer
    max_length: int
    batch_size: int


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the vectors, as the weights walk will meet it."""

    shape: tuple[int, ...]
    layer: int | None
    linear: bool  # an attention or MLP matrix: SVDs, alignment, factor
    changed: tuple[bool, ...]  # τ ≠ 0, per vector
    base_itemsize: int


@dataclass(frozen=True)
class AnalyzeInputs:
    """What the analysis estimate needs of the vectors and their base, as plain data."""

    model: ModelShape
    tensors: tuple[TensorPlan, ...]
    vector_itemsize: int
    vector_bytes: int  # of one vector's tensors file
    verify_bytes: int  # of vector files not yet checked against their manifests

    @property
    def n_vectors(self) -> int:
        return len(self.tensors[0].changed) if self.tensors else 0

    @classmethod
    def of(cls, vectors: Sequence, base: Checkpoint) -> AnalyzeInputs:
        from tunevec.core.vector import DTYPES, TENSORS_FILE, VERIFIED_FILE

        plans = []
        for name, entry in vectors[0].manifest.tensors.items():
            role = classify(name, base.architecture)
            plans.append(
                TensorPlan(
                    shape=tuple(entry.shape),
                    layer=role.layer,
                    linear=role.role in LINEAR and role.is_linear and len(entry.shape) == 2,
                    changed=tuple(v.manifest.tensors[name].norm > 0 for v in vectors),
                    base_itemsize=_bytes(base, name),
                )
            )
        sizes = [(v.path / TENSORS_FILE).stat().st_size for v in vectors]
        unverified = [
            size for v, size in zip(vectors, sizes, strict=True) if not (v.path / VERIFIED_FILE).exists()
        ]
        return cls(
            model=ModelShape.of(base),
            tensors=tuple(plans),
            vector_itemsize=DTYPES[vectors[0].manifest.dtype].itemsize,
            vector_bytes=max(sizes),
            verify_bytes=sum(unverified),
        )


def estimate_analyze(
    vectors: Sequence,
    base: Checkpoint,
    opts,
    probe: ProbeWork | None,
    device: torch.device,
) -> Estimate:
    """``tunevec analyze`` of these vectors against ``base`` (see :func:`analyze_cost`)."""
    return analyze_cost(AnalyzeInputs.of(vectors, base), opts, probe, device)


def analyze_cost(inputs: AnalyzeInputs, opts, probe: ProbeWork | None, device: torch.device) -> Estimate:
    """The weights walk (one SVD of each changed W, one of each τ, projections) and the probe (the resident base
    model, base + τ of each vector streamed in, per-layer statistics)."""
    from tunevec.analysis.walk import in_layers

    shape = inputs.model
    n_vec = inputs.n_vectors
    b_vec = inputs.vector_itemsize
    host_base = costs.HOST_BASELINE[device.type]
    stages = [Stage("open", {"hash": float(inputs.verify_bytes)}, 0, host_base)]

    work = {"io": 0.0, "svd": 0.0, "svd_full": 0.0, "matmul": 0.0}
    largest_any = largest_lin = 0
    for t in inputs.tensors:
        if not in_layers(t.layer, opts.layers):
            continue
        n = _numel(t.shape)
        work["io"] += n * b_vec * n_vec + (n * t.base_itemsize if t.linear else 0)
        largest_any = max(largest_any, n)
        if not t.linear:
            continue
        largest_lin = max(largest_lin, n)
        m, k_in = t.shape
        dim = min(m, k_in)
        full = opts.method_for(t.shape) == "full"
        if any(t.changed):  # one SVD of W serves every vector
            if full:
                work["svd_full"] += full_svd_flops(m, k_in, vectors=True)
            else:
                cap = min(opts.k or min(opts.max_k, max(1, dim // 4)), dim)
                work["svd"] += randomized_svd_flops(m, k_in, cap)
        for changed in t.changed:
            if not changed:
                continue
            if full:
                work["svd_full"] += full_svd_flops(m, k_in, vectors=False)
            else:
                work["svd"] += randomized_svd_flops(m, k_in, min(opts.sketch, dim))
            if opts.factor_energy is not None:
                f_full = opts.svd == "full" or 2 * opts.factor_max_rank >= dim
                reused = not f_full and not full and min(opts.sketch, dim) == min(opts.factor_max_rank, dim)
                if f_full:
                    work["svd_full"] += full_svd_flops(m, k_in, vectors=True)
                elif not reused:
                    work["svd"] += randomized_svd_flops(m, k_in, min(opts.factor_max_rank, dim))
                work["matmul"] += 2.0 * m * k_in * min(opts.factor_max_rank, dim)  # τ − BA at the chosen rank
            work["matmul"] += 4.0 * m * k_in * min(opts.max_k, dim)  # U_kᵀτ and τV_k
    if n_vec > 1:
        pairs = n_vec * (n_vec - 1) / 2
        work["matmul"] += (
            3.0 * pairs * sum(_numel(t.shape) for t in inputs.tensors if in_layers(t.layer, opts.layers))
        )
    b_w = shape.dtype_bytes
    walk_dev = int(
        n_vec * (4 + b_vec) * largest_any + (4 + b_w + 12) * largest_lin + (2**28 if n_vec > 1 else 0)
    )
    walk_host = host_base + int((n_vec * b_vec + b_w) * largest_any)
    stages.append(
        Stage(
            "weights",
            work,
            walk_dev,
            walk_host,
            {
                "tau per vector": n_vec * (4 + b_vec) * largest_any,
                "W and its factors": (16 + b_w) * largest_lin,
            },
        )
    )
    if probe is not None:
        stages.append(_probe_stage(shape, probe, n_vec, inputs.vector_bytes, opts.layers, host_base))
    return _finish("analyze", device, stages)


def _probe_stage(
    shape: ModelShape, probe: ProbeWork, n_vec: int, vector_bytes: int, layers, host_base: int
) -> Stage:
    n_states = len(shape.layer_params) + 1
    if layers is not None:
        n_states = len([i for i in range(n_states) if layers[0] <= i <= layers[1]])
    d, n = shape.hidden, probe.kept_tokens
    small = min(n, d)
    fwd = shape.forward_flops(probe.padded_tokens, probe.max_length)
    work = {
        "load": float(shape.bytes),
        "io": float(
            n_vec * (vector_bytes + shape.bytes)
        ),  # each τ streamed in, the base's tensors streamed back
        "forward": fwd * (1 + n_vec),
        "stats": n_vec * n_states * (8.0 * n * d * small + 30.0 * small**3),
    }
    model = 4 * shape.params
    states = 2 * n_states * n * d * 4
    batch_tokens = probe.batch_size * probe.max_length
    transient = int(
        batch_tokens * 4 * (n_states * d + shape.vocab + 4 * d + 3 * shape.intermediate)
        + 4 * n * d * 8
        + 3 * small * small * 8
    )
    return Stage(
        "probe",
        work,
        model + states + transient,
        host_base + 8 * shape.largest,
        {"model (float32)": model, "hidden states": states, "batch and statistics": transient},
    )


# ----------------------------------------------------------------------------- attribute


@dataclass(frozen=True)
class AttributionWork:
    """One vector's share of an attribution run: its changed tensors, components and examples."""

    first_layer: int
    components: int
    changed_params: int
    changed_bytes: int  # of τ as stored
    examples: int
    tokens: int
    max_length: int
    scored: int
    ks: int
    seeds: int
    batch_size: int

    @property
    def evaluations(self) -> int:
        """Patched models evaluated at most: base, tuned, all components, each component alone and left out,
        and per k the top-k, its two other rankings and one per seed (the cache removes repeats)."""
        return 3 + 2 * self.components + self.ks * (3 + self.seeds)

    @property
    def suffix_passes(self) -> float:
        """The evaluations in units of one pass over layers first..: the single-component ones start at their
        component's layer (half the layers on average), and the two remembered models cost a pass each."""
        return 3 + self.ks * (3 + self.seeds) + 0.5 * 2 * self.components + 2


def estimate_attribute(
    shape: ModelShape, jobs: Sequence[AttributionWork], device: torch.device, *, tf32: bool = False
) -> Estimate:
    """``tunevec attribute``: the resident float32 base, each vector's changed tensors and a copy of the base's on
    the device, then patched evaluations of layers first.. and two backward passes per batch (``tf32``: matrix
    products on TF32 tensor cores)."""
    forward = "forward_tf32" if tf32 and device.type == "cuda" else "forward"
    host_base = costs.HOST_BASELINE[device.type]
    stages = [Stage("load", {"load": float(shape.bytes)}, 4 * shape.params, host_base + 8 * shape.largest)]
    n_layers = len(shape.layer_params)
    for i, job in enumerate(jobs):
        suffix = range(job.first_layer, n_layers)
        one = shape.forward_flops(job.tokens, job.max_length, suffix, head_tokens=job.scored)
        prefix = shape.forward_flops(job.tokens, job.max_length, range(job.first_layer), head_tokens=0)
        work = {
            "io": float(job.changed_bytes + job.changed_params * shape.dtype_bytes),
            forward: prefix
            + one * job.suffix_passes
            + 6.0 * one,  # estimates: forward + backward at both ends
        }
        patches = job.changed_params * shape.dtype_bytes + job.changed_bytes
        batch_tokens = job.batch_size * job.max_length
        acts = int(
            len(suffix) * shape.activation_bytes(batch_tokens, job.max_length)
            + 3 * 4 * min(job.scored, batch_tokens) * shape.vocab
            + 4 * job.tokens * shape.hidden
        )
        remembered = 2 * len(suffix) * job.tokens * shape.hidden * 4
        stages.append(
            Stage(
                f"vector {i + 1}",
                work,
                # + the weight hook's float32 temporaries of one tensor (gradient, delta, product)
                4 * shape.params + patches + acts + remembered + 12 * shape.largest_linear,
                host_base + 8 * shape.largest,
                {
                    "model (float32)": 4 * shape.params,
                    "base copy and tau": patches,
                    "activations": acts,
                    "remembered layer inputs": remembered,
                },
                details={
                    "prefix_flops": prefix,
                    "evaluation_flops": one,
                    "layer_flops": one_layer_mean(shape, job),
                    "head_flops": 2.0 * shape.hidden * shape.vocab * job.scored,
                    "evaluations": job.evaluations,
                },
            )
        )
    return _finish("attribute", device, stages)


def one_layer_mean(shape: ModelShape, job: AttributionWork) -> float:
    """Flops of one decoder layer of the suffix over the job's tokens, averaged over its layers."""
    layers = range(job.first_layer, len(shape.layer_params))
    body = shape.forward_flops(job.tokens, job.max_length, layers, head_tokens=0)
    return body / max(1, len(layers))


# ----------------------------------------------------------------------------- the check


def check(estimate: Estimate, max_memory: int | None, options: Sequence[str], *, quiet: bool = False) -> None:
    """Print the estimate; refuse (TunevecError) when its peak exceeds ``max_memory`` or, without it, what the
    device (and, for a GPU, the host) reports free. ``options`` name what the command could do instead."""
    if not quiet:
        for line in estimate.lines():
            print(line, flush=True)
    limit = max_memory if max_memory is not None else available_memory(estimate.device)
    where = "--max-memory" if max_memory is not None else f"free on {estimate.device}"
    problems = []
    if limit is not None and estimate.device_bytes > limit:
        problems.append(f"{format_size(estimate.device_bytes)} needed, {format_size(limit)} {where}")
    if estimate.device.type == "cuda":
        host = available_memory(torch.device("cpu"))
        if host is not None and estimate.host_bytes > host:
            problems.append(
                f"{format_size(estimate.host_bytes)} of host memory needed, {format_size(host)} free"
            )
    if problems:
        raise TunevecError(
            f"{estimate.command} would not fit: {'; '.join(problems)}. Options: " + "; ".join(options)
        )
