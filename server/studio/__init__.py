"""The steering studio: a web page served by ``tunevec serve`` at ``/tunevec/`` to try mixtures side by side.

Two halves, one rule between them:

- the **shell** (``GET /tunevec/`` and its assets: ``static/index.html``, ``studio.js``, ``studio.css``) is plain
  files shipped in this package, with no build step. It holds no data, so it is the one part of the server a
  browser may load without the API key (a browser cannot send a bearer token when it opens a URL);
- **every data call** the page makes carries the key: vLLM's own ``/v1/completions``, ``/v1/chat/completions`` and
  ``/tokenize``, tunevec's ``/v1/tunevec/describe``, and the studio's two routes below, which sit under
  ``/v1/tunevec/`` with the other tunevec routes and are guarded like them.

The page asks for the key when the server answers 401, keeps it in the tab's ``sessionStorage`` (gone when the tab
closes; never in ``localStorage``, a URL or a cookie), and writes the code snippets it offers with
``$TUNEVEC_API_KEY`` in place of the key.

This module is imported by the API-key middleware (``shell_path``), so it imports nothing heavy; the routes are in
``routes.py`` and the vector cards and reports in ``library.py``.

Routes (``mount``):

- ``GET /tunevec/``, ``GET /tunevec/{asset}``: the shell, with a strict Content-Security-Policy (scripts, styles
  and connections from this origin only; no inline script);
- ``GET /v1/tunevec/studio``: what the page needs to start: the served base name, the server's limits
  (``max_abs_alpha``, ``max_components``), the layer count, the named variants as JSON specs, and one card per
  vector (``server/studio/library.py``);
- ``GET /v1/tunevec/studio/reports/{id}/{file}``: a file of an analysis report that covers a vector (summary.md,
  report.json, the PNG plots).
"""

from __future__ import annotations

from typing import Any

PREFIX = "/tunevec/"
API = "/v1/tunevec/studio"


def shell_path(method: str | None, path: str) -> bool:
    """Whether a request is for the studio's shell: the static page and its assets, which carry no data.

    The API-key middleware lets these through without the key (and only these: GET or HEAD, under ``/tunevec``).
    """
    return method in ("GET", "HEAD") and (path == PREFIX.rstrip("/") or path.startswith(PREFIX))


def mount(app: Any) -> None:
    """Add the studio's routes to vLLM's app (called by the endpoint plugin's ``attach_router``)."""
    from tunevec.server.studio.routes import add_routes

    add_routes(app)
