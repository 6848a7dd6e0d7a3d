"""The tunevec server: vLLM's own OpenAI application, with steering resolved in front of it.

A request's path through tunevec, in three files:
1. here, ``SteeringMiddleware`` reads ``model`` / ``steering`` from the JSON body and asks the registry;
2. ``server/mixtures.py`` parses and validates the spec and returns the composed adapter's ``LoRARequest``;
3. ``steering/lora.py`` builds that adapter (exact sum of alpha_i * B_i A_i).
The middleware then rewrites ``model`` to the mixture's canonical name, registered with vLLM's model registry, and
vLLM's unchanged handlers serve the request with that adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from tunevec.server.config import ServerConfig
from tunevec.server.mixtures import MixtureRegistry
from tunevec.steering.library import VectorLibrary
from tunevec.steering.lora import TARGET_MODULES
from tunevec.steering.spec import Spec

from tunevec.core.checkpoint import Checkpoint
from tunevec.core.errors import NotFoundError, TunevecError

logger = logging.getLogger("tunevec.server")
STEERED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
OPEN_PATHS = frozenset({"/health", "/ping"})
MAX_BODY_BYTES = 64 * 1024 * 1024


def error_body(message: str, status: int, param: str | None = "model") -> dict:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError"}
    return {
        "error": {
            "message": message,
            "type": kind.get(status, "BadRequestError"),
            "param": param,
            "code": status,
        }
    }


class SteeringRouter:
    """Decides which weights a request runs with; the only place that reads ``model`` and ``steering``."""

    def __init__(self, config: ServerConfig, registry: MixtureRegistry, serving_models: Any):
        self.config = config
        self.registry = registry
        self.serving_models = serving_models
        self.variants = {name: registry.parse(text) for name, text in config.variants.items()}
        registry._on_evict = self._unregister  # an evicted mixture's name stops resolving; its files stay

    def _unregister(self, mixture) -> None:
        self.serving_models.lora_requests.pop(mixture.name, None)

    def spec_for(self, payload: dict) -> Spec | None:
        model = payload.get("model")
        steering = payload.pop("steering", None)
        is_base = model in (None, "", self.config.served_model_name)
        if steering is not None:
            if not is_base:
                raise TunevecError(
                    f"the request names model {model!r} and also gives extra_body steering; give one of them "
                    f"(use model={self.config.served_model_name!r} with steering)"
                )
            if not isinstance(steering, dict | str):
                raise TunevecError('steering must be an object such as {"medical": 0.8} or a spec string')
            return self.registry.parse(steering)
        if is_base:
            return None
        if not isinstance(model, str):
            raise TunevecError("model must be a string")
        if model in self.variants:
            return self.variants[model]
        return self.registry.parse(model)

    async def route(self, payload: dict) -> dict | None:
        """The payload rewritten for its mixture, or None when the body can go to vLLM as it came (the base)."""
        had_steering = "steering" in payload
        spec = self.spec_for(payload)
        if spec is None:
            return payload if had_steering else None
        mixture = await self.registry.resolve(spec)
        self.serving_models.lora_requests[mixture.name] = mixture.request
        payload["model"] = mixture.name
        return payload


class SteeringMiddleware:
    """Pure ASGI middleware: rewrites steered request bodies before vLLM's handlers parse them.

    Installed through vLLM's own ``--middleware`` option (vLLM builds the app and its middleware stack); it finds
    the router on ``app.state`` once ``serve`` has set it up.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = _state(scope, "tunevec_router")
        if router is None or scope.get("method") != "POST" or scope["path"] not in STEERED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks += message.get("body", b"")
            more = message.get("more_body", False)
            if len(chunks) > MAX_BODY_BYTES:
                await JSONResponse(error_body("request body too large", 413, None), 413)(scope, receive, send)
                return
        body = bytes(chunks)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            try:
                routed = await router.route(payload)
            except TunevecError as exc:
                status = 404 if isinstance(exc, NotFoundError) else 400
                await JSONResponse(error_body(str(exc), status), status)(scope, receive, send)
                return
            except Exception as exc:  # a steering bug must fail this request, never the server
                logger.exception("tunevec: steering failed")
                await JSONResponse(error_body(f"steering failed: {exc}", 500, None), 500)(
                    scope, receive, send
                )
                return
            if routed is not None:
                body = json.dumps(routed).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        scope = dict(scope, headers=headers)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _state(scope: Scope, key: str):
    """tunevec's objects on the app's state; None for non-HTTP scopes and before the server is set up."""
    if scope["type"] not in ("http", "websocket") or "app" not in scope:
        return None
    return getattr(scope["app"].state, key, None)


class ApiKeyMiddleware:
    """With an API key set, every route needs it (vLLM's own guard covers only /v1); /health stays open."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        digest = _state(scope, "tunevec_key_digest")
        if (
            digest is None
            or scope.get("method") == "OPTIONS"
            or scope.get("method") == "OPTIONS"
            or scope["path"] in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
        scheme, _, token = auth.partition(" ")
        ok = scheme.lower() == "bearer" and secrets.compare_digest(
            hashlib.sha256(token.encode()).digest(), digest
        )
        if not ok:
            await JSONResponse(error_body("missing or wrong API key", 401, None), 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def tunevec_routes(
    config: ServerConfig, library: VectorLibrary, registry: MixtureRegistry, router: SteeringRouter
):
    api = APIRouter()

    @api.get("/v1/tunevec/vectors")
    async def list_vectors() -> dict:
        return {"data": [vector_summary(library[n], registry) for n in library.names()]}

    @api.get("/v1/tunevec/vectors/{name}")
    async def show_vector(name: str):
        if name not in library.names():
            return JSONResponse(
                error_body(f"unknown vector {name!r}; known: {library.names()}", 404, "name"), 404
            )
        return library[name].manifest.to_json()

    @api.post("/v1/tunevec/describe")
    async def describe(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(
                error_body('body must be JSON: {"spec": "..."} or {"steering": {...}}', 400, None), 400
            )
        try:
            raw = body.get("spec", body.get("steering")) if isinstance(body, dict) else None
            if raw is None:
                raise TunevecError('give {"spec": "medical:0.8+math:0.4"} or {"steering": {"medical": 0.8}}')
            spec = (
                router.variants.get(raw)
                if isinstance(raw, str) and raw in router.variants
                else registry.parse(raw)
            )
            return registry.describe(spec)
        except TunevecError as exc:
            return JSONResponse(error_body(str(exc), 400, "spec"), 400)

    return api


def vector_summary(vec, registry: MixtureRegistry) -> dict:
    by_role: dict[str, float] = {}
    for e in vec.manifest.tensors.values():
        by_role[e.role] = by_role.get(e.role, 0.0) + e.norm**2
    adapter = registry.adapters.get(vec.name)
    return {
        "name": vec.name,
        "path": str(vec.path),
        "base_fingerprint": vec.manifest.base.get("fingerprint"),
        "tuned": vec.manifest.tuned.get("path"),
        "num_tensors": len(vec.manifest.tensors),
        "norm": sum(by_role.values()) ** 0.5,
        "norm_by_role": {r: v**0.5 for r, v in sorted(by_role.items())},
        "adapter": None
        if adapter is None
        else {"rank": adapter.max_module_rank, "dropped": adapter.meta.get("dropped")},
    }


def replace_models_route(
    app: FastAPI, config: ServerConfig, library: VectorLibrary, router: SteeringRouter
) -> None:
    """/v1/models: vLLM's list (base and registered mixtures) plus named variants and vectors, with their specs."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/v1/models"]

    @app.get("/v1/models")
    async def show_models(raw_request: Request):
        listed = (await raw_request.app.state.openai_serving_models.show_available_models()).model_dump()
        named = {n: (s.canonical(), "variant") for n, s in router.variants.items()}
        named.update({n: (n, "vector") for n in library.names() if n not in named})
        for m in listed["data"]:
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
                    "root": config.base,
                    "parent": config.served_model_name,
                    "tunevec": {"kind": kind, "spec": spec},
                }
            )
        return JSONResponse(listed)


def vllm_namespace(config: ServerConfig) -> Namespace:
    """vLLM's own serve arguments, built with vLLM's parser so every default and check is vLLM's."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [
        "--model", config.base,
        "--served-model-name", config.served_model_name,
        "--host", config.host,
        "--port", str(config.port),
        "--dtype", config.dtype,
        "--tensor-parallel-size", str(config.tensor_parallel_size),
        "--enable-lora",
        "--max-lora-rank", str(config.max_lora_rank),
        "--max-loras", str(config.max_loras),
        "--max-cpu-loras", str(max(config.max_loras, config.cache_capacity)),
        # Only the projections tunevec adapters carry: otherwise vLLM wraps lm_head too and every decode step,
        # base requests included, pays a vocab x rank LoRA pass for a delta no adapter has (docs/benchmarks.md).
        "--lora-target-modules", *TARGET_MODULES,
        "--enable-tokenizer-info-endpoint",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if config.enforce_eager:
        argv.append("--enforce-eager")
    if config.max_model_len:
        argv += ["--max-model-len", str(config.max_model_len)]
    if config.inject:
        from tunevec.steering.vllm_loader import LOAD_FORMAT, SETTINGS_KEY

        settings = {
            "spec": config.inject,
            "vectors": VectorLibrary.from_dir(config.vectors).paths(),
            "base": config.base,
        }
        argv += [
            "--load-format",
            LOAD_FORMAT,
            "--model-loader-extra-config",
            json.dumps({SETTINGS_KEY: settings}),
        ]
    # vLLM's own --middleware hook; the last one given is the outermost, so the key check runs first.
    argv += ["--middleware", f"{__name__}.SteeringMiddleware", "--middleware", f"{__name__}.ApiKeyMiddleware"]
    argv += config.vllm_args
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


async def serve(config: ServerConfig) -> None:
    """Start the engine, build vLLM's app, put tunevec in front of it, serve until stopped."""
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    # The CPU backend sizes its KV cache from the environment; an explicit VLLM_CPU_KVCACHE_SPACE wins.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    base = Checkpoint(config.base)
    config.num_layers = base.num_layers
    library = VectorLibrary.from_dir(config.vectors, base)
    registry = MixtureRegistry(config, library)
    if config.inject:
        registry.parse(config.inject)  # refuse a bad --inject before the engine spends a minute starting
    args = vllm_namespace(config)
    _listen, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine_client:
        tasks = await engine_client.get_supported_tasks()
        app = build_app(args, tasks, engine_client.model_config)
        await init_app_state(engine_client, app.state, args, tasks)
        router = SteeringRouter(config, registry, app.state.openai_serving_models)
        app.include_router(tunevec_routes(config, library, registry, router))
        replace_models_route(app, config, library, router)
        app.state.tunevec_router = router
        if config.api_key:
            app.state.tunevec_key_digest = hashlib.sha256(config.api_key.encode()).digest()
        logger.info(
            "tunevec: serving %s with vectors %s on %s:%d",
            config.base,
            library.names(),
            config.host,
            config.port,
        )
        shutdown = await serve_http(
            app,
            sock=sock,
            enable_ssl_refresh=False,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=False,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=None,
            ssl_certfile=None,
            ssl_ca_certs=None,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=None,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
        )
    try:
        await shutdown
    finally:
        sock.close()
