"""The studio's routes: the shell's files and the two data routes (see ``server/studio/__init__.py``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from tunevec.server.studio import API, PREFIX
from tunevec.server.studio.library import REPORT_FILE_NAME, report_by_id, vector_cards

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
}
# The shell runs only its own files: no inline script, no third-party origin. Report images arrive through fetch
# (the key) and are shown from blob: URLs.
SHELL_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' blob: data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _assets() -> dict[str, Path]:
    """The shell's files by URL name; nothing outside ``static/`` can be named."""
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}


def add_routes(app: FastAPI) -> None:
    """The shell under ``/tunevec/``, the data routes under ``/v1/tunevec/studio``."""
    assets = _assets()

    async def index(request: Request) -> Response:
        return _file(assets["index.html"])

    async def redirect(request: Request) -> Response:
        return RedirectResponse(url=request.url.path + "/", status_code=308)

    async def asset(name: str) -> Response:
        if name not in assets:
            return JSONResponse({"error": {"message": f"no studio file {name[:80]!r}", "code": 404}}, 404)
        return _file(assets[name])

    async def session(request: Request) -> dict:
        state = request.app.state
        config, router = state.tunevec_config, state.tunevec_router
        return {
            "served_model_name": config.served_model_name,
            "api_key_required": bool(config.api_key),
            "num_layers": _num_layers(state),
            "limits": {
                "max_abs_alpha": config.max_abs_alpha,
                "max_components": config.max_components,
                "max_model_len": config.max_model_len,
                "max_dropped_share": config.max_dropped_share,
            },
            "variants": {
                name: {"canonical": spec.canonical(), "json": spec.to_json()}
                for name, spec in router.variants.items()
            },
            "vectors": vector_cards(state),
        }

    async def report_file(report_id: str, name: str, request: Request) -> Response:
        report = report_by_id(request.app.state, report_id)
        if report is None:
            return JSONResponse(
                {"error": {"message": f"no analysis report {report_id[:40]!r} on this server", "code": 404}},
                404,
            )
        if not REPORT_FILE_NAME.fullmatch(name) or name not in report.files():
            return JSONResponse(
                {"error": {"message": f"report {report_id} has no file {name[:80]!r}", "code": 404}}, 404
            )
        path = report.folder / name
        if path.suffix in (".md", ".json") and not request.app.state.tunevec_config.expose_paths:
            text = report.redact(path.read_text(encoding="utf-8", errors="replace"))
            return Response(
                text, media_type=CONTENT_TYPES[path.suffix], headers={"Cache-Control": "no-cache"}
            )
        return _file(path, headers={"Cache-Control": "no-cache"})

    async def shell_info(request: Request) -> dict:
        # The one fact the shell may learn without the key: whether it needs one (a 401 would tell as much). It
        # lets the page ask for the key before making a request that would fail.
        return {"api_key_required": bool(request.app.state.tunevec_config.api_key)}

    app.add_api_route(PREFIX.rstrip("/"), redirect, methods=["GET"], include_in_schema=False)
    app.add_api_route(PREFIX, index, methods=["GET"], include_in_schema=False)
    app.add_api_route(PREFIX + "server.json", shell_info, methods=["GET"], include_in_schema=False)
    app.add_api_route(PREFIX + "{name}", asset, methods=["GET"], include_in_schema=False)
    app.add_api_route(API, session, methods=["GET"])
    app.add_api_route(API + "/reports/{report_id}/{name}", report_file, methods=["GET"])


def _file(path: Path, headers: dict[str, str] | None = None) -> Response:
    return Response(
        path.read_bytes(),
        media_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
        headers=SHELL_HEADERS if headers is None else headers,
    )


def _num_layers(state: object) -> int | None:
    cached = getattr(state, "tunevec_studio_layers", None)
    if cached is None:
        from tunevec.core.checkpoint import Checkpoint

        cached = Checkpoint(state.tunevec_config.base).num_layers
        state.tunevec_studio_layers = cached
    return cached
