"""The differential harness: every mixture path of a real server against a transformers reference and itself alone.

One ``Config`` is one `tunevec serve` (dtype, LoRA dtype, prefix caching, chunked prefill, tensor parallelism).
``run_config`` sends, to that server:

- each request **alone**, one at a time;
- the same requests again in concurrent **batches** of five kinds: with the base; with other mixtures of the same
  vectors (the shared-stack path); with mixtures of other vectors (unrelated adapters); more distinct mixtures than
  ``--max-loras``; and everything at once;

in two request kinds: ``echo`` + ``logprobs`` (lm-eval's scoring: prompt logprobs) and greedy generation (the
tokens and their logprobs). Each answer is compared with the same request alone, and with transformers run on
``base + sum_i alpha_i B_i A_i`` (the server's own factors, rounded to the LoRA dtype, on the modules the engine
reports it carries). The server's ``/v1/tunevec/engine`` statistics prove that the batched paths were taken.

Bounds (``Bounds``):
- float32 engines: 1e-4 nats per token against the reference and against alone;
- bfloat16 engines: against the same request alone, the A/A noise measured in the same run (the base alone
  against the base in the same batches), with a floor of 2^-7 nats per token (one bfloat16 rounding step of a
  logprob near -2: the smallest change bfloat16 can show); against the float32 reference, the mean per-token
  distance may be at most 3x the base's own mean distance to its reference in the same run (a mixture adds, per
  adapted module, a shrink and an expand rounded to bfloat16: measured 2.0x on the tiny fixtures, 2026-12-04,
  AMD EPYC). The token-for-token check against the reference's greedy choice applies to float32 only.

``tests/test_differential.py`` runs the matrix's core in `make test`; ``bench/bench_differential.py`` prints all of
it. A planted fault (``fault_extension.py``: one slot's coefficient off by 2%) must make the harness fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.vector import TuningVector
from tunevec.eval.launch import free_port, start_server
from tunevec.steering.lora import LoraAdapter, compose, factor_cache
from tunevec.steering.spec import Spec

TESTS = Path(__file__).resolve().parent
RANK = 8
MAX_LORA_RANK = 16
BF16_FLOOR = 2.0**-7

# Mixtures of the same two vectors (one shared stack), of one vector each (unrelated adapters), and more distinct
# ones than --max-loras (MAX_LORAS): every batch kind below draws from these.
# ACTIVATION names an activation vector (derived from medical, ``activation_vectors``): served through the same
# slots, alone and combined with weight vectors.
ACTIVATION = "medical-act"
SHARED = [
    "medical:0.8+math:0.4",
    "medical:-0.5+math:0.9",
    "medical@mlp:1.2+math@attention:0.7",
    f"{ACTIVATION}[1:]:2+math:0.5",
]
UNRELATED = ["medical:0.6", "math:-0.8", f"{ACTIVATION}:1.5"]
MANY = [f"medical:{0.1 * k:.1f}+math:{1 - 0.1 * k:.1f}" for k in range(1, 6)]
MAX_LORAS = 2
BATCHES = {
    "with the base": ["base", SHARED[0], "base", UNRELATED[0]],
    "shared vectors": SHARED,
    "unrelated adapters": [UNRELATED[0], UNRELATED[1], UNRELATED[2], SHARED[0]],
    f"more mixtures than --max-loras {MAX_LORAS}": MANY,
    "everything at once": ["base", *SHARED, *UNRELATED, *MANY[:2]],
}


def activation_vectors(fixtures: Path, vectors: Path, out: Path) -> Path:
    """``out``: a copy of ``vectors`` plus ``medical-act``, the activation vector derived from ``medical``."""
    import shutil

    from tunevec.cli import main as tunevec_main

    if not (out / ACTIVATION / "activation.json").exists():
        for name in ("medical", "math"):
            if not (out / name).exists():
                shutil.copytree(vectors / name, out / name)
        argv = ["derive", str(vectors / "medical"), "--base", str(fixtures / "base"), "--out", str(out / ACTIVATION),
                "--probe", str(fixtures / "probe.jsonl"), "--max-probe-texts", "24", "--force"]  # fmt: skip
        assert tunevec_main(argv) == 0
    return out


GENERATED_TOKENS = 12
MAX_MODEL_LEN = 512
BATCH_SETTLE_S = 1.0  # how long a batch's requests have to reach the paused engine (see _send)


@dataclass(frozen=True)
class Config:
    name: str
    dtype: str = "float32"
    lora_dtype: str = "auto"
    prefix_caching: bool = True
    chunked_tokens: int | None = (
        64  # --max-num-batched-tokens: prompts longer than this are prefilled in chunks
    )
    tensor_parallel: int = 1
    fault_extension: bool = (
        False  # serve with fault_extension.FaultyWorkerExtension (behaves the same unplanted)
    )

    def serve_args(self) -> list[str]:
        args = ["--dtype", self.dtype, "--adapter-rank", str(RANK), "--max-lora-rank", str(MAX_LORA_RANK),
                "--max-loras", str(MAX_LORAS), "--max-model-len", str(MAX_MODEL_LEN)]  # fmt: skip
        if self.tensor_parallel > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel)]
        vllm = []
        if self.lora_dtype != "auto":
            vllm += ["--lora-dtype", self.lora_dtype]
        if not self.prefix_caching:
            vllm.append("--no-enable-prefix-caching")
        if self.chunked_tokens:
            vllm += ["--max-num-batched-tokens", str(self.chunked_tokens), "--max-num-seqs", "16"]
        if self.fault_extension:
            vllm += ["--worker-extension-cls", "fault_extension.FaultyWorkerExtension"]
        return args + (["--", *vllm] if vllm else [])

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
        if self.tensor_parallel > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(self.tensor_parallel))
        # vLLM's dev-mode routes: /pause and /resume release each batch at once (_send), /collective_rpc plants
        # the fault (fault_extension).
        env["VLLM_SERVER_DEV_MODE"] = "1"
        return env


@contextlib.contextmanager
def serve(config: Config, base: Path, vectors: Path, log: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tunevec.cli", "serve", "--base", str(base), "--vectors", str(vectors),
           "--port", str(port), *config.serve_args()]  # fmt: skip
    with start_server(cmd, port, log, what=f"tunevec server ({config.name})", env=config.env()) as server:
        yield server.url


@dataclass
class Answer:
    logprobs: list[float]  # per prompt token from the second on (echo), or per generated token
    tokens: list[int] = field(default_factory=list)  # generated token ids (greedy)


def _body(model: str, prompt: list[int], kind: str) -> dict:
    if kind == "lead":  # a long base generation the batch runs beside (see _send)
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_MODEL_LEN - len(prompt),  # runs until the batch is answered (then aborted)
            "temperature": 0,
            "ignore_eos": True,
        }
    if kind == "echo":
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
        }
    return {"model": model, "prompt": prompt, "max_tokens": GENERATED_TOKENS, "temperature": 0, "logprobs": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True}  # fmt: skip


def _answer(payload: dict, prompt: list[int], kind: str) -> Answer:
    lp = payload["choices"][0]["logprobs"]
    if kind == "echo":
        assert lp["token_logprobs"][0] is None
        return Answer(lp["token_logprobs"][1 : len(prompt)])
    return Answer(lp["token_logprobs"], [int(t.removeprefix("token_id:")) for t in lp["tokens"]])


async def _send(
    url: str, requests: list[tuple[str, tuple[int, ...], str]], lead: bool = False
) -> list[Answer]:
    """The requests; several at once share engine steps, whatever the load on the machine.

    On a busy machine the front end can hand requests to the engine more slowly than the engine finishes them, and
    a "batch" then runs one request at a time. So a batch is sent while the scheduler is paused (vLLM's dev-mode
    ``/pause?mode=keep``: requests queue, nothing steps) and released at once with ``/resume``. With ``lead``, a
    long base generation is decoding before the pause and until the batch is answered, so base tokens share the
    batch's steps too."""
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(model: str, prompt: tuple[int, ...], kind: str) -> Answer:
            r = await client.post(url + "/v1/completions", json=_body(model, list(prompt), kind))
            assert r.status_code == 200, f"{model}: {r.status_code} {r.text[:500]}"
            return _answer(r.json(), prompt, kind)

        if len(requests) == 1 and not lead:
            return [await one(*requests[0])]
        leading = None
        if lead:
            started = asyncio.Event()

            async def lead_generation() -> None:
                body = {**_body("base", list(requests[0][1]), "lead"), "stream": True}
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    async for _ in r.aiter_lines():
                        started.set()  # decoding
                started.set()

            leading = asyncio.ensure_future(lead_generation())
            await asyncio.wait_for(started.wait(), 300)
        (await client.post(url + "/pause", params={"mode": "keep"})).raise_for_status()
        try:
            pending = [asyncio.ensure_future(one(*req)) for req in requests]
            await asyncio.sleep(BATCH_SETTLE_S)  # the front end hands every request to the paused engine
        finally:
            (await client.post(url + "/resume")).raise_for_status()
        answers = await asyncio.gather(*pending)
        if leading is not None:
            # Still decoding (it is as long as the context allows): closing its stream makes vLLM abort it.
            leading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leading
        return answers


def reference_weights(
    base: Path, vectors: Path, cache_dir: Path, spec_text: str, lora_dtype: torch.dtype, carried: set[str]
) -> dict[str, torch.Tensor]:
    """base + sum_i alpha_i B_i A_i of the carried tensors, with the server's own factors rounded to the LoRA dtype,
    and + sum_i alpha_i tau_i of the tensors carried whole (norms, biases)."""
    if spec_text == "base":
        return {}
    spec = Spec.parse(spec_text)
    adapters = {}
    for name in spec.vectors:
        if (vectors / name / "activation.json").exists():
            adapters[name] = LoraAdapter({})  # steers the residual stream (Reference's hooks), no weights
            continue
        folder = factor_cache(
            TuningVector(vectors / name), cache_dir, rank=RANK, energy=None, max_rank=MAX_LORA_RANK
        )
        loaded = LoraAdapter.load(folder)
        adapters[name] = LoraAdapter(
            {
                t: (b.to(lora_dtype).float(), a.to(lora_dtype).float())
                for t, (b, a) in loaded.factors.items()
                if t in carried
            },
            deltas={t: d for t, d in loaded.deltas.items() if t in carried},
        )
    mixture = compose(spec, adapters, max_rank=10**6)
    checkpoint = Checkpoint(base)
    out = {}
    for tensor in mixture.factors:
        name = (
            "model.embed_tokens.weight"
            if tensor == "lm_head.weight" and tensor not in checkpoint.tensors
            else tensor
        )
        if tensor == "lm_head.weight" and name != tensor:
            continue  # a tied head is the embedding: moved once, with the embedding
        out[name] = (checkpoint.read(name).double() + mixture.delta(tensor).double()).float()
    for comp in spec.components:
        for tensor, delta in adapters[comp.vector].deltas.items():
            if comp.applies_to(tensor):
                current = out.get(tensor, checkpoint.read(tensor).double())
                out[tensor] = (current.double() + comp.alpha * delta.double()).float()
    return out


class Reference:
    """transformers in float32 on the reference weights of each variant (cached per variant)."""

    def __init__(
        self, base: Path, vectors: Path, cache_dir: Path, lora_dtype: torch.dtype, carried: set[str]
    ):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.original = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.args = (base, vectors, cache_dir, lora_dtype, carried)
        self._cache: dict[tuple[str, tuple[int, ...], str], Answer] = {}

    def steering_hooks(self, spec_text: str) -> list:
        """Forward hooks adding each activation component's alpha * direction to its decoder layers' outputs."""
        from tunevec.analysis.derive import decoder_layers
        from tunevec.core.activation import ActivationVector

        if spec_text == "base":
            return []
        added: dict[int, torch.Tensor] = {}
        vectors = self.args[1]
        for comp in Spec.parse(spec_text).components:
            folder = vectors / comp.vector
            if not (folder / "activation.json").exists():
                continue
            for layer, direction in ActivationVector(folder).directions().items():
                start, stop = comp.layers or (0, None)
                if layer >= start and (stop is None or layer < stop):
                    added[layer] = added.get(layer, 0) + comp.alpha * direction.double()

        def hook(vector: torch.Tensor):  # noqa: ANN202
            def add(_module, _inputs, output):  # noqa: ANN001, ANN202
                stream = output[0] if isinstance(output, tuple) else output
                stream += vector.to(stream.dtype)

            return add

        layers = decoder_layers(self.model)
        return [layers[k].register_forward_hook(hook(v.float())) for k, v in added.items()]

    def answer(self, spec: str, prompt: tuple[int, ...], kind: str) -> Answer:
        prompt = list(prompt)
        key = (spec, tuple(prompt), kind)
        if key not in self._cache:
            state = dict(self.original)
            state.update(reference_weights(*self.args[:3], spec, *self.args[3:]))
            if self.model.config.tie_word_embeddings and "lm_head.weight" in state:
                # one tensor under two names: both must carry the moved embedding, or the second copy undoes it
                state["lm_head.weight"] = state["model.embed_tokens.weight"]
            self.model.load_state_dict(state, strict=False)
            hooks = self.steering_hooks(spec)
            with torch.no_grad():
                if kind == "echo":
                    logp = torch.log_softmax(self.model(torch.tensor([prompt])).logits[0].double(), -1)
                    self._cache[key] = Answer([float(logp[i - 1, prompt[i]]) for i in range(1, len(prompt))])
                else:
                    ids, lps = list(prompt), []
                    for _ in range(GENERATED_TOKENS):
                        logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].double(), -1)
                        nxt = int(logp.argmax())
                        lps.append(float(logp[nxt]))
                        ids.append(nxt)
                    self._cache[key] = Answer(lps, ids[len(prompt) :])
            for handle in hooks:
                handle.remove()
        return self._cache[key]


@dataclass
class Row:
    config: str
    batch: str
    kind: str
    vs_alone: float  # max |logprob| difference against the same request alone, nats per token
    vs_reference: float  # float32: max |logprob| difference against transformers; bfloat16: the mean
    tokens_differ: (
        int  # generated tokens that differ from the reference's greedy choice (0 expected in float32)
    )
    bound_alone: float
    bound_reference: float
    exact: bool = True  # float32: tokens must match the reference's greedy choice

    @property
    def ok(self) -> bool:
        return (
            self.vs_alone <= self.bound_alone
            and self.vs_reference <= self.bound_reference
            and (self.tokens_differ == 0 or not self.exact)
        )


def _diff(a: Answer, b: Answer) -> float:
    """Max |logprob difference| over the positions both answers share: every prompt token, or the generated
    tokens up to the first one where the two greedy paths part (after it, they condition on other text)."""
    n = min(len(a.logprobs), len(b.logprobs))
    if a.tokens:
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False)) if x != y), n)
    return max((abs(a.logprobs[i] - b.logprobs[i]) for i in range(n)), default=0.0)


def _mean_diff(pairs: list[tuple[Answer, Answer]]) -> float:
    """Mean |logprob difference| per shared position (as ``_diff``) over all pairs."""
    total = count = 0.0
    for a, b in pairs:
        n = min(len(a.logprobs), len(b.logprobs))
        if a.tokens:
            n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False)) if x != y), n)
        total += sum(abs(a.logprobs[i] - b.logprobs[i]) for i in range(n))
        count += n
    return total / count if count else 0.0


def _tokens_differ(a: Answer, b: Answer) -> int:
    return sum(x != y for x, y in zip(a.tokens, b.tokens, strict=False))


@dataclass
class Result:
    rows: list[Row]
    aa: float  # bfloat16: the base's A/A, alone vs batched
    base_vs_reference: float
    stats: dict[str, int]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def table(self) -> str:
        lines = [
            "| config | batch | request | vs alone | bound | vs reference | bound | tokens off |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.config} | {r.batch} | {r.kind} | {r.vs_alone:.1e} | {r.bound_alone:.1e} | "
                f"{r.vs_reference:.1e} | {r.bound_reference:.1e} | {r.tokens_differ} |"
            )
        return "\n".join(lines)


def engine_report(url: str) -> dict:
    return httpx.get(url + "/v1/tunevec/engine", timeout=60).json()


def carried_tensors(url: str, names: list[str]) -> set[str]:
    """The tensors the server's adapters carry for ``names`` (its own account, ``describe``)."""
    out: set[str] = set()
    for name in names:
        r = httpx.post(url + "/v1/tunevec/describe", json={"spec": name}, timeout=60)
        r.raise_for_status()
        out.update(r.json()["modules"], r.json()["deltas"])
    return out


def run_config(config: Config, url: str, base: Path, vectors: Path, token_prompts: list[list[int]]) -> Result:
    """Every batch kind and request kind of the matrix on one running server."""
    prompts = [tuple(p) for p in token_prompts]
    cache_dir = vectors / ".tunevec-cache"
    lora_dtype = getattr(torch, config.dtype if config.lora_dtype == "auto" else config.lora_dtype)
    carried = carried_tensors(url, ["medical", "math"])
    reference = Reference(base, vectors, cache_dir, lora_dtype, carried)
    fp32 = config.dtype == "float32"
    models = sorted({m for batch in BATCHES.values() for m in batch})
    requests = [(m, p, kind) for kind in ("echo", "generate") for m in models for p in prompts]
    alone = {}
    for req in requests:  # one at a time
        alone[req] = asyncio.run(_send(url, [req]))[0]
    batched: dict[str, list[tuple[tuple, Answer]]] = {}
    for name, batch in BATCHES.items():
        for kind in ("echo", "generate"):
            reqs = [(m, p, kind) for m in batch for p in prompts]
            answers = asyncio.run(_send(url, reqs, lead="base" in batch))
            batched[f"{name}|{kind}"] = list(zip(reqs, answers, strict=True))
    aa = max(
        (_diff(ans, alone[req]) for pairs in batched.values() for req, ans in pairs if req[0] == "base"),
        default=0.0,
    )
    base_pairs = [(alone[r], reference.answer(*r)) for r in requests if r[0] == "base"]
    base_ref = max(_diff(a, b) for a, b in base_pairs) if fp32 else _mean_diff(base_pairs)
    bound_alone = 1e-4 if fp32 else max(aa, BF16_FLOOR)
    bound_reference = 1e-4 if fp32 else 3 * base_ref

    def vs_reference(pairs: list[tuple[tuple, Answer]]) -> float:
        compared = [(a, reference.answer(*r)) for r, a in pairs]
        return max(_diff(a, b) for a, b in compared) if fp32 else _mean_diff(compared)

    rows = []
    for kind in ("echo", "generate"):
        pairs = [(r, alone[r]) for r in requests if r[2] == kind and r[0] != "base"]
        off = sum(_tokens_differ(a, reference.answer(*r)) for r, a in pairs)
        rows.append(
            Row(config.name, "alone", kind, 0.0, vs_reference(pairs), off, bound_alone, bound_reference, fp32)
        )
    for key, pairs in batched.items():
        name, kind = key.split("|")
        pairs = [(r, a) for r, a in pairs if r[0] != "base"]
        vs_alone = max(_diff(a, alone[r]) for r, a in pairs)
        off = sum(_tokens_differ(a, reference.answer(*r)) for r, a in pairs)
        rows.append(
            Row(
                config.name,
                name,
                kind,
                vs_alone,
                vs_reference(pairs),
                off,
                bound_alone,
                bound_reference,
                fp32,
            )
        )
    stats: dict[str, int] = {}
    for worker in engine_report(url)["stats"]:
        for k, v in worker.items():
            stats[k] = stats.get(k, 0) + v
    return Result(rows, aa, base_ref, stats)


def check_alone(
    config: Config, url: str, base: Path, vectors: Path, token_prompts: list[list[int]], specs: list[str]
) -> Result:
    """The alone rows only (each request by itself, against the reference), for ``specs``."""
    prompts = [tuple(p) for p in token_prompts]
    cache_dir = vectors / ".tunevec-cache"
    lora_dtype = getattr(torch, config.dtype if config.lora_dtype == "auto" else config.lora_dtype)
    reference = Reference(base, vectors, cache_dir, lora_dtype, carried_tensors(url, ["medical", "math"]))
    rows = []
    for kind in ("echo", "generate"):
        reqs = [(m, p, kind) for m in specs for p in prompts]
        answers = [asyncio.run(_send(url, [r]))[0] for r in reqs]
        worst = max(_diff(a, reference.answer(*r)) for r, a in zip(reqs, answers, strict=True))
        off = sum(_tokens_differ(a, reference.answer(*r)) for r, a in zip(reqs, answers, strict=True))
        rows.append(Row(config.name, "alone", kind, 0.0, worst, off, 1e-4, 1e-4))
    return Result(rows, 0.0, 0.0, {})


def plant_fault(url: str, factor: float) -> None:
    """Make the next mixture the workers compose serve one coefficient ``factor`` times too large."""
    r = httpx.post(
        url + "/collective_rpc", json={"method": "tunevec_plant_fault", "args": [str(factor)]}, timeout=60
    )
    r.raise_for_status()
