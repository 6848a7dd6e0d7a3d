"""`tunevec serve` is vLLM's own server with tunevec's plugins: vLLM's flags work, and vLLM without tunevec is untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tunevec.eval.launch import ServerProcess, free_port, spawn

UNTOUCHED_CHECK = r"""
import os
os.environ.pop("VLLM_PLUGINS", None)
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.platforms import current_platform
from vllm.lora.punica_wrapper import punica_cpu
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
from vllm.model_executor.model_loader import get_model_loader  # noqa: F401
from vllm.v1.worker import lora_model_runner_mixin
import vllm.model_executor.model_loader as loaders
assert current_platform.get_punica_wrapper().endswith("punica_cpu.PunicaWrapperCPU"), current_platform.get_punica_wrapper()
assert lora_model_runner_mixin.LRUCacheWorkerLoRAManager is LRUCacheWorkerLoRAManager
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
assert not getattr(CPUModelRunner._get_prompt_logprobs_dict, "_tunevec_prompt_logprob_routing", False)
assert not any(getattr(getattr(punica_cpu, op), "__wrapped__", None) for op in ("bgmv_shrink", "sgmv_expand"))
registry = getattr(loaders, "_LOAD_FORMAT_TO_MODEL_LOADER", {})
assert "tunevec" not in registry, sorted(registry)
print("untouched")
"""


def test_vllm_without_tunevec_plugins_named_loads_no_tunevec_patch():
    """A user's own vLLM in this environment: VLLM_PLUGINS unset, so vLLM runs every general plugin, ours too."""
    out = subprocess.run([sys.executable, "-c", UNTOUCHED_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "untouched" in out.stdout, out.stderr[-3000:]


@pytest.mark.slow
def test_plain_vllm_server_runs_without_tunevec(tiny_fixtures, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_fixtures / "base"),
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enable-lora",
           # a fixed KV cache: vLLM's CPU default reserves 92% of free memory and refuses to start beside other servers
           "--kv-cache-memory-bytes", str(256 << 20)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    server = spawn(cmd, port, tmp_path / "vllm.log", "plain vLLM", env)
    try:
        server.wait_ready(600)
        r = httpx.post(server.url + "/v1/completions", json={"model": str(tiny_fixtures / "base"), "prompt": "a",
                                                            "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200, r.text
        assert httpx.get(server.url + "/v1/tunevec/vectors").status_code == 404
    finally:
        server.stop()
    log = (tmp_path / "vllm.log").read_text()
    # The first line is the command itself. Allowed: vLLM naming the endpoint plugin it found and, unlisted, did not
    # load, and the access-log line of the 404 above.
    allowed = ("explicitly allowlisted", 'get /v1/tunevec/vectors http/1.1" 404')
    lines = [ln.lower() for ln in log.split("\n")[1:]]
    assert not [ln for ln in lines if "tunevec" in ln and not any(a in ln for a in allowed)]
    assert "PunicaWrapperCPU" in log


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.mark.slow
def test_tls_flags_after_the_double_dash_serve_https(tiny_fixtures, tiny_vectors, tmp_path):
    import openai

    key, cert = self_signed(tmp_path)
    port = free_port()
    cmd = [sys.executable, "-m", "tunevec.cli", "serve", "--base", str(tiny_fixtures / "base"),
           "--vectors", str(tiny_vectors), "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
           "--adapter-rank", "8", "--max-lora-rank", "16", "--", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]  # fmt: skip
    server = spawn(cmd, port, tmp_path / "tls.log", "tunevec server (TLS)")
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health", verify=str(cert), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.alive(), ServerProcess.log_tail(server)
            assert time.monotonic() < deadline, "TLS server did not come up"
            time.sleep(1)
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on that port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).raise_for_status()
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", http_client=httpx.Client(verify=str(cert)))
        out = client.completions.create(
            model="medical:0.5", prompt="The diagnosis", max_tokens=3, temperature=0
        )
        assert out.model == "medical:0.5" and out.usage.completion_tokens == 3
    finally:
        server.stop()
