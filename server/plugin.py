"""tunevec's vLLM endpoint plugin (entry point ``vllm.endpoint_plugins: tunevec_server``).

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them, which ``tunevec serve`` does. ``attach_router``
adds tunevec's routes (and replaces ``/v1/models`` through vLLM's own override rule); ``init_state`` builds the
steering state the middleware reads, from the validated settings ``tunevec serve`` passed in the environment.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from argparse import Namespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import TunevecError
from tunevec.server import studio
from tunevec.server.config import ServerConfig
from tunevec.server.middleware import SteeringRouter, error_body
from tunevec.server.mixtures import MixtureRegistry
from tunevec.server.served import EngineLoadError, ServedMixtures
from tunevec.steering.library import VectorLibrary
from tunevec.steering.vllm import CAPABILITIES_RPC, CARRIED_RPC, STATS_RPC, installed_build, read_snapshot

logger = logging.getLogger("tunevec.server")
MAX_DESCRIBE_BYTES = 64 * 1024


class TunevecEndpoints:
    name = "tunevec_server"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route("/v1/tunevec/vectors", list_vectors, methods=["GET"])
        app.add_api_route("/v1/tunevec/vectors/{name}", show_vector, methods=["GET"])
        app.add_api_route("/v1/tunevec/describe", describe, methods=["POST"])
        app.add_api_route("/v1/tunevec/engine", show_engine, methods=["GET"])
        app.add_api_route("/v1/models", show_models, methods=["GET"])
        studio.mount(app)  # the steering studio at /tunevec/ (server/studio)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        config = ServerConfig.from_env()
        base = Checkpoint(config.base)
        library = VectorLibrary.from_dir(config.vectors, base)
        # The factors `tunevec serve` announced to the workers, as announced: nothing is factorised or re-read.
        registry = MixtureRegistry.from_snapshot(
            read_snapshot(os.environ), config, base.num_layers, library, config.cache_dir
        )
        # Which modules vLLM's LoRA layers really receive, and what each worker can serve exactly, asked of every
        # worker (tensor-parallel ranks must all agree).
        answers = await engine_client.collective_rpc(CARRIED_RPC, args=(registry.factor_modules(),))
        capabilities = await engine_client.collective_rpc(CAPABILITIES_RPC)
        registry.restrict_to_engine(set.intersection(*(set(a) for a in answers)), capabilities)
        for answer in capabilities:
            logger.info("tunevec: worker capabilities %s", answer)
        for name, text in config.variants.items():
            try:
                registry.mixture(registry.parse(text))
            except TunevecError as exc:
                raise TunevecError(f"variant {name!r}: {exc}") from None

        async def repair(mixture) -> bool:  # noqa: ANN001
            rebuilt = False
            for name in mixture.spec.vectors:
                try:
                    rebuilt |= await asyncio.to_thread(registry.repair, (name,))
                except TunevecError as exc:
                    # The artifact itself is damaged since start-up: the server's fault (a 500, not the request's
                    # 400), with its file named in the log only (responses carry no server paths).
                    logger.error("tunevec: cannot rebuild the factors of vector %s: %s", name, exc)
                    raise EngineLoadError(
                        f"vector {name!r} is damaged on the server and must be extracted again; mixture "
                        f"{mixture.name!r} cannot be served until then"
                    ) from exc
            return rebuilt

        served = ServedMixtures(state.openai_serving_models, engine_client, config.cache_capacity, repair)
        state.tunevec_config = config
        state.tunevec_engine = {"build": installed_build(), "workers": capabilities}
        state.tunevec_engine_client = engine_client
        state.tunevec_library = library
        state.tunevec_router = SteeringRouter(config.served_model_name, config.variants, registry, served)
        if config.api_key:
            state.tunevec_key_digest = hashlib.sha256(config.api_key.encode()).digest()


def _tunevec(request: Request) -> tuple[ServerConfig, VectorLibrary, SteeringRouter]:
    s = request.app.state
    return s.tunevec_config, s.tunevec_library, s.tunevec_router


def vector_summary(name: str, library: VectorLibrary, router: SteeringRouter, expose_paths: bool) -> dict:
    """What a client may know of one vector: its kind, size, the base it was made for, the layers it touches."""
    vec = library[name]
    factors = router.registry.vectors[name]
    if library.kind(name) == "activation":
        norms = vec.manifest.get("norms", {})
        out = {
            "name": name,
            "kind": "activation",
            "content_digest": factors.digest,
            "base_fingerprint": vec.manifest.get("base", {}).get("fingerprint"),
            "layers": vec.layers,
            "norm": sum(float(v) ** 2 for v in norms.values()) ** 0.5,
            "source": {k: v for k, v in vec.manifest.get("source", {}).items() if k != "path"},
        }
        return out | ({"path": str(vec.path)} if expose_paths else {})
    by_role: dict[str, float] = {}
    for e in vec.manifest.tensors.values():
        by_role[e.role] = by_role.get(e.role, 0.0) + e.norm**2
    out = {
        "name": name,
        "kind": "weights",
        "content_digest": factors.digest,
        "base_fingerprint": vec.manifest.base.get("fingerprint"),
        "num_tensors": len(vec.manifest.tensors),
        "layers": sorted(
            {e.layer for e in vec.manifest.tensors.values() if e.layer is not None and e.norm > 0}
        ),
        "norm": sum(by_role.values()) ** 0.5,
        "norm_by_role": {r: v**0.5 for r, v in sorted(by_role.items())},
        "adapter": {"rank": max(factors.module_ranks.values(), default=0), "dropped": factors.dropped},
    }
    if expose_paths:
        out |= {"path": str(vec.path), "tuned": vec.manifest.tuned.get("path")}
    return out


async def list_vectors(request: Request) -> dict:
    config, library, router = _tunevec(request)
    return {"data": [vector_summary(n, library, router, config.expose_paths) for n in library.names()]}


async def show_vector(name: str, request: Request):  # noqa: ANN201
    config, library, _ = _tunevec(request)
    if name not in library.names():
        return JSONResponse(
            error_body(f"unknown vector {name[:80]!r}; known: {library.names()}", 404, "name"), 404
        )
    vec = library[name]
    manifest = (
        vec.manifest.to_json() if library.kind(name) == "weights" else json.loads(json.dumps(vec.manifest))
    )
    if not config.expose_paths:
        for side in ("base", "tuned"):
            if isinstance(manifest.get(side), dict):
                manifest[side] = {k: v for k, v in manifest[side].items() if k != "path"}
    return manifest


async def show_engine(request: Request) -> dict:
    """What the engine can serve exactly: each worker's account of tunevec's patches (``mixtures`` and
    ``head_delta`` are null, or why they are refused), its platform, dtype and LoRA dtype; and how the grouped op
    has served the steps so far (``stats``, one entry a worker)."""
    stats = await request.app.state.tunevec_engine_client.collective_rpc(STATS_RPC)
    return {**request.app.state.tunevec_engine, "stats": stats}


async def describe(request: Request):  # noqa: ANN201
    """What a spec would run as, without running it: ``{"spec": "..."}`` or ``{"steering": {...}}``."""
    _, _, router = _tunevec(request)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_DESCRIBE_BYTES:
            return JSONResponse(error_body(f"body over {MAX_DESCRIBE_BYTES} bytes", 413, None), 413)
    try:
        payload = json.loads(body)
        raw = payload.get("spec", payload.get("steering")) if isinstance(payload, dict) else None
        if raw is None:
            raise TunevecError('give {"spec": "medical:0.8+math:0.4"} or {"steering": {"medical": 0.8}}')
        if isinstance(raw, str) and raw in router.variants:
            spec = router.variants[raw]
        else:
            spec = router.registry.parse(raw)
        return router.registry.describe(spec)
    except (ValueError, RecursionError) as exc:
        message = str(exc) if isinstance(exc, TunevecError) else 'body must be JSON: {"spec": "..."}'
        return JSONResponse(error_body(message, 400, "spec"), 400)


async def show_models(request: Request) -> JSONResponse:
    """vLLM's list (the base and registered mixtures) plus named variants and vectors, each with its spec."""
    config, library, router = _tunevec(request)
    listed = (await request.app.state.openai_serving_models.show_available_models()).model_dump()
    named = {n: (s.canonical(), "variant") for n, s in router.variants.items()}
    named.update({n: (n, "vector") for n in library.names() if n not in named})
    for m in listed["data"]:
        if not config.expose_paths:
            m["root"] = config.served_model_name if m.get("parent") else m["id"]
        if m["id"] in named:
            spec, kind = named.pop(m["id"])
            m["tunevec"] = {"kind": kind, "spec": spec}
        elif m.get("parent"):
            m["tunevec"] = {"kind": "mixture", "spec": m["id"]}
    for name, (spec, kind) in named.items():
        listed["data"].append(
            {
                "id": name,
                "object": "model",
                "owned_by": "tunevec",
                "root": config.base if config.expose_paths else config.served_model_name,
                "parent": config.served_model_name,
                "tunevec": {"kind": kind, "spec": spec},
            }
        )
    return JSONResponse(listed)
