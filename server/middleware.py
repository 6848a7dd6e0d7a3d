"""tunevec in front of vLLM's handlers: which weights a request runs with, decided from its JSON body.

A request's path through tunevec, in three files:
1. here, ``SteeringMiddleware`` reads ``model`` / ``steering`` from the body and ``SteeringRouter`` turns them into
   a spec, a named ``Mixture`` (``server/mixtures.py``) registered with the engine (``server/served.py``);
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
import re
import secrets
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tunevec.core.errors import NotFoundError, TunevecError
from tunevec.server.served import EngineLoadError
from tunevec.server.studio import shell_path

logger = logging.getLogger("tunevec.server")
STEERED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
OPEN_PATHS = frozenset({"/health", "/ping"})
OWN_PATHS = "/v1/tunevec/"  # tunevec's own routes read (and bound) their bodies themselves
MAX_BODY_BYTES = 64 * 1024 * 1024
# On every steered response whose vectors are served in part: which components leave out what share of their tau
# (biases, norms, modules vLLM cannot adapt), so a partial vector is never served without a word.
LEFT_OUT_HEADER = b"x-tunevec-left-out"
# The most JSON text of `model`, `steering` or `extra_body` a request's steering costs to parse: far above any
# spec a server accepts (steering.spec.MAX_SPEC_CHARS characters, or its JSON form), and what keeps a 10 MB
# steering object from holding the event loop for seconds (issue 12, finding 1): it is refused after 64 KiB.
MAX_FIELD_CHARS = 64 * 1024
STEERING_FIELDS = frozenset({"model", "steering", "extra_body"})
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def error_body(message: str, status: int, param: str | None = "model") -> dict:
    kind = {401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError"}.get(status)
    if kind is None:
        kind = "InternalServerError" if status >= 500 else "BadRequestError"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class FieldTooLarge(TunevecError):
    """A steering field whose JSON text is over ``MAX_FIELD_CHARS``; refused without parsing the rest of it."""

    def __init__(self, key: str):
        super().__init__(
            f"`{key}` is over {MAX_FIELD_CHARS} characters of JSON, more than any steering spec can be; nothing "
            "was run"
        )
        self.key = key


@dataclass
class JsonObject:
    """A JSON object request body, read member by member as the client sent it.

    Every top-level value is parsed by the json module's C decoder (what ``json.loads`` would do, and what vLLM
    does again), except ``model``, ``steering`` and ``extra_body``: those are parsed from at most
    ``MAX_FIELD_CHARS`` characters, so the steering work of a request is bounded whatever its size, while prompts
    may be as large as vLLM accepts. Rewriting a body keeps every other member's text as sent (no re-encoding of
    a large prompt).
    """

    text: str
    members: list[
        tuple[str, int, int, Any]
    ]  # (key, where its name starts, where its value ends, value or None)

    @classmethod
    def read(cls, body: bytes) -> JsonObject | None:
        """The body's members, or None for JSON that is not an object (vLLM answers that as it would).

        Raises ValueError for text that is not JSON (as ``json.loads`` would), RecursionError for nesting beyond
        Python's limit, ``FieldTooLarge`` for an oversized steering field.
        """
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads reads bytes
        i = _WS.match(text).end()
        if not text.startswith("{", i):
            json.loads(text)  # JSON of another kind goes to vLLM as it came; what is not JSON is refused here
            return None
        members: list[tuple[str, int, int, Any]] = []
        i = _WS.match(text, i + 1).end()
        closing = i if text.startswith("}", i) else -1
        while closing < 0:
            if not text.startswith('"', i):
                raise ValueError(f"expected a member name at character {i}")
            key, j = scanstring(text, i + 1)
            j = _WS.match(text, j).end()
            if not text.startswith(":", j):
                raise ValueError(f"expected ':' at character {j}")
            j = _WS.match(text, j + 1).end()
            if key in STEERING_FIELDS:
                value, end = _bounded_value(text, j, key)
            else:
                value, end = None, _DECODER.raw_decode(text, j)[1]  # parsed only to find its end
            members.append((key, i, end, value))
            k = _WS.match(text, end).end()
            if text.startswith(",", k):
                i = _WS.match(text, k + 1).end()
            elif text.startswith("}", k):
                closing = k
            else:
                raise ValueError(f"expected ',' or '}}' at character {k}")
        if _WS.match(text, closing + 1).end() != len(text):
            raise ValueError(f"extra data after the JSON object at character {closing + 1}")
        return cls(text, members)

    def fields(self) -> dict[str, Any]:
        """``model``, ``steering`` and ``extra_body`` as ``json.loads`` would give them (the last of duplicates)."""
        return {key: value for key, _, _, value in self.members if key in STEERING_FIELDS}

    def rewritten(self, model: str) -> bytes:
        """The body with ``model`` set and ``steering`` left out; every other member as the client sent it."""
        kept = [self.text[s:e] for key, s, e, _ in self.members if key not in ("model", "steering")]
        kept.append('"model": ' + json.dumps(model))
        return ("{" + ", ".join(kept) + "}").encode("utf-8", "surrogatepass")


def _bounded_value(text: str, start: int, key: str) -> tuple[Any, int]:
    """The JSON value at ``start``, parsed from at most ``MAX_FIELD_CHARS`` characters; (value, end)."""
    window = text[start : start + MAX_FIELD_CHARS]
    longer = len(text) - start > MAX_FIELD_CHARS
    try:
        value, size = _DECODER.raw_decode(window)
    except ValueError:
        if longer:  # cut by the window (or malformed, which the bound makes no cheaper to tell)
            raise FieldTooLarge(key) from None
        raise
    if longer and size == len(window):  # a number or literal that may go on past the window
        raise FieldTooLarge(key)
    return value, start + size


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
        path = _path(scope) if router is not None else ""
        if router is None or scope.get("method") != "POST" or path.startswith(OWN_PATHS):
            await self.app(scope, receive, send)
            return
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
            parsed = JsonObject.read(bytes(body)) if body else None
        except RecursionError:
            await _reply(scope, receive, send, "request JSON is nested too deeply", 400, None)
            return
        except FieldTooLarge as exc:
            await _reply(scope, receive, send, str(exc), 400, exc.key)
            return
        except ValueError as exc:
            # vLLM parses bodies with the same json module and would refuse this one too, though not always with
            # an OpenAI error body (an integer beyond Python's digit limit gets FastAPI's {"detail": ...}).
            await _reply(scope, receive, send, f"request body is not valid JSON: {str(exc)[:200]}", 400, None)
            return
        mixture = None
        try:
            if parsed is not None:
                payload = parsed.fields()
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
                        body = bytearray(parsed.rewritten(mixture.name))
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
        if mixture is not None and mixture.left_out:
            send = _with_header(send, LEFT_OUT_HEADER, _left_out_value(mixture.left_out))
        try:
            await self.app(_with_length(scope, len(body)), _replay(bytes(body), receive), send)
        finally:
            if mixture is not None:
                router.served.release(mixture)


async def _reply(
    scope: Scope, receive: Receive, send: Send, message: str, status: int, param: str | None = "model"
):
    await JSONResponse(error_body(message, status, param), status)(scope, receive, send)


def _left_out_value(shares: dict[str, float]) -> bytes:
    return ",".join(f"{comp}={share:.4%}" for comp, share in sorted(shares.items())).encode()


def _with_header(send: Send, name: bytes, value: bytes) -> Send:
    async def send_with_header(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = dict(message, headers=[*message.get("headers", []), (name, value)])
        await send(message)

    return send_with_header


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
        path, method = _path(scope), scope.get("method")
        # The studio's shell (its static page: no data) opens without the key; its data calls carry it.
        if digest is None or method == "OPTIONS" or path in OPEN_PATHS or shell_path(method, path):
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
