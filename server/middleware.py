"""tunevec in front of vLLM's handlers: which weights a request runs with, decided from its JSON body.

A request's path through tunevec, in three files:
1. here, ``SteeringMiddleware`` reads ``model`` / ``steering`` from the body and ``SteeringRouter`` turns them into
   a spec, a named ``Mixture`` (``server/mixtures.py``) registered with the engine (``server/engine_models.py``);
   the body's ``model`` is rewritten to the mixture's served name and vLLM's unchanged handlers serve it;
2. ``server/mixtures.py`` checks the spec and names its ``LoRARequest`` (``tunevec-mixture:<spec>``);
3. ``steering/vllm_lora.py``, in vLLM's worker, composes that adapter from the vectors' resident factors, and
   ``steering/punica_grouped.py`` applies it.

Both classes are plain ASGI middleware installed through vLLM's own ``--middleware`` option; they find tunevec's
state on ``app.state`` (set by the endpoint plugin, ``server/plugin.py``) and do nothing without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from tunevec.server.engine_models import EngineLoadError

from tunevec.core.errors import NotFoundError, TunevecError

logger = logging.getLogger("tunevec.server")
STEERED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
OPEN_PATHS = frozenset({"/health", "/ping"})
MAX_BODY_BYTES = 64 * 1024 * 1024


def error_body(message: str, status: int, param: str | None = "model") -> dict:
    kind = {401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError"}.get(status)
    if kind is None:
        kind = "InternalServerError" if status >= 500 else "BadRequestError"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _path(scope: Scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", "") or "")


def _state(scope: Scope, key: str) -> Any:
    """tunevec's objects on the app's state; None for non-HTTP scopes and before the server is set up."""
    if scope["type"] not in ("http", "websocket") or "app" not in scope:
        return None
    return getattr(scope["app"].state, key, None)


class SteeringRouter:
    """Decides which weights a request runs with; the only place that reads ``model`` and ``steering``."""

    def __init__(self, base_name: str, variants: dict[str, str], registry: Any, served: Any):
        self.base_name = base_name
        self.registry = registry
        self.served = served
        self.variants = {name: registry.parse(text) for name, text in variants.items()}

    def spec_for(self, payload: dict) -> Any:
        """The request's spec, or None for the base model. Raises TunevecError on anything ambiguous."""
        model = payload.get("model")
        if "extra_body" in payload:
            raise TunevecError(
                "the body has a literal 'extra_body' key: SDKs merge extra_body into the top level, so over raw "
                'HTTP send {"model": ..., "steering": {...}} at the top level'
            )
        steering = payload.pop("steering", None)
        is_base = model in (None, "", self.base_name)
        if steering is not None:
            if not is_base:
                raise TunevecError(
                    f"the request names model {str(model)[:80]!r} and also gives extra_body steering; give one of them "
                    f"(use model={self.base_name!r} with steering)"
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


class SteeringMiddleware:
    """Rewrites steered request bodies before vLLM's handlers parse them; refuses steering where it cannot act."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router: SteeringRouter | None = _state(scope, "tunevec_router")
        if router is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        path = _path(scope)
        steered = path in STEERED_PATHS
        headers = dict(scope["headers"])
        if not steered and b"json" not in headers.get(b"content-type", b"application/json"):
            await self.app(scope, receive, send)  # uploads (audio, files) carry no steering
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await _reply(scope, receive, send, f"request body over {MAX_BODY_BYTES} bytes", 413, None)
                return
        try:
            payload = json.loads(body) if body else None
        except RecursionError:
            await _reply(scope, receive, send, "request JSON is nested too deeply", 400, None)
            return
        except ValueError:
            payload = None  # not JSON: vLLM answers it as it would
        mixture = None
        try:
            if isinstance(payload, dict):
                if not steered:
                    if "steering" in payload or "extra_body" in payload:
                        raise TunevecError(
                            f"steering is served on {', '.join(sorted(STEERED_PATHS))}, not on {path}; nothing "
                            "was run (name a mixture in `model` there, or drop `steering`)"
                        )
                else:
                    spec = router.spec_for(payload)
                    if spec is not None:
                        mixture = router.registry.mixture(spec)
                        await router.served.acquire(mixture)
                        payload["model"] = mixture.name
                        body = bytearray(json.dumps(payload).encode())
        except NotFoundError as exc:
            await _reply(scope, receive, send, str(exc), 404)
            return
        except EngineLoadError as exc:
            await _reply(scope, receive, send, str(exc), 500)
            return
        except TunevecError as exc:
            await _reply(scope, receive, send, str(exc), 400)
            return
        except Exception as exc:  # a steering bug fails this request, never the server
            logger.exception("tunevec: steering failed")
            await _reply(scope, receive, send, f"steering failed: {type(exc).__name__}", 500, None)
            return
        try:
            await self.app(_with_length(scope, len(body)), _replay(bytes(body), receive), send)
        finally:
            if mixture is not None:
                router.served.release(mixture)


async def _reply(
    scope: Scope, receive: Receive, send: Send, message: str, status: int, param: str | None = "model"
):
    await JSONResponse(error_body(message, status, param), status)(scope, receive, send)


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    return dict(scope, headers=headers)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class ApiKeyMiddleware:
    """With an API key set, every route needs it (vLLM's own guard covers only /v1); /health and /ping stay open."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        digest = _state(scope, "tunevec_key_digest")
        if digest is None or scope.get("method") == "OPTIONS" or _path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
        scheme, _, token = auth.partition(" ")
        ok = scheme.lower() == "bearer" and secrets.compare_digest(
            hashlib.sha256(token.encode()).digest(), digest
        )
        if not ok:
            await _reply(scope, receive, send, "missing or wrong API key", 401, None)
            return
        await self.app(scope, receive, send)
