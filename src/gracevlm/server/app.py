"""The ASGI application: routes (thin; the work is in ``serving.py``) and the gate in front of them.

``create_app(config)`` returns the gate (an ASGI app) wrapping a FastAPI app. The gate, outermost, gives
every request an id (``X-Request-ID``, echoed), applies ``guards.py`` (Host, Origin / CORS, JSON content
type: 403 / 415), checks the API key on ``/v1/*`` (``hmac.compare_digest``), caps the body size (413), counts requests by route and status for ``/metrics``, and turns any unhandled
exception into a 500 with OpenAI's error body (logged with the request id; no stack trace in the body).

Unless ``ui=False`` (``--no-ui``), ``GET /`` serves the web chat page (``static/``: plain HTML/CSS/JS, no
build step, nothing fetched from elsewhere) that talks to ``/v1/chat/completions`` like any other client.
"""
from __future__ import annotations

import hmac
import importlib.resources
import logging
import re
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from . import guards
from . import protocol as P
from .metrics import CONTENT_TYPE
from .serving import APIError, ServerConfig, ServerState, Serving

log = logging.getLogger("gracevlm.server")

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class BodyTooLarge(APIError):
    def __init__(self, cap: int):
        super().__init__(413, f"the request body is larger than the server's limit of {cap} bytes",
                         "request_too_large")


# the web chat page: the only files served (no directory listing, no paths from the client)
UI_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
UI_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
              "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
              "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
              "frame-ancestors 'none'"}


def _ui_file(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/ui/"):
        return "/ui/{file}"
    return "other"


class Gate:
    """Outermost ASGI middleware (see the module docstring)."""

    def __init__(self, app: Any, state: ServerState):
        self.app = app
        self.fastapi = app
        self.state = state
        key = state.config.api_key
        self._key = key.encode() if key else None
        self._cap = state.config.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope["state"] = {**scope.get("state", {}), "request_id": rid}
        route = route_label(scope["path"])
        status = [0]

        cors: list = []

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode()),
                                                  *cors]}
            await send(message)

        try:
            config = self.state.config
            guards.check_host(headers, config.allowed_hosts)
            origin = guards.cross_origin(headers, config.allowed_origins)
            if origin is not None:
                cors.extend(guards.cors_headers(origin))
                if scope.get("method") == "OPTIONS":
                    await self._answer(send_with_id, APIError(204, "", None), guards.preflight_headers())
                    return
            guards.check_json_body(scope.get("method", ""), scope["path"], headers)
            if self._key is not None and scope["path"].startswith("/v1"):
                auth = headers.get(b"authorization", b"")
                token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(token, self._key):
                    msg = "missing API key" if not token else "incorrect API key"
                    await self._answer(send_with_id, APIError(401, f"{msg}; send it as 'Authorization: Bearer KEY'",
                                                              "invalid_api_key"))
                    return
            length = headers.get(b"content-length")
            if length is not None and (not length.strip().isdigit() or int(length) > self._cap):
                await self._answer(send_with_id, BodyTooLarge(self._cap))
                return
            total = [0]

            async def capped_receive():
                message = await receive()
                if message["type"] == "http.request":
                    total[0] += len(message.get("body", b""))
                    if total[0] > self._cap:
                        raise BodyTooLarge(self._cap)
                return message

            await self.app(scope, capped_receive, send_with_id)
        except Exception as exc:
            if isinstance(exc, APIError) and not status[0]:
                await self._answer(send_with_id, exc)
                return
            log.error("request %s (%s %s) failed", rid, scope.get("method"), scope["path"], exc_info=exc)
            if not status[0]:
                await self._answer(send_with_id, internal_error(rid))
        finally:
            self.state.metrics.count_http(route, status[0] or 500)

    @staticmethod
    async def _answer(send, err: APIError, headers: dict[str, str] | None = None) -> None:
        response = Response(status_code=204, headers=headers) if err.status == 204 else err.response()
        await response({"type": "http"}, _no_receive, send)


async def _no_receive():  # pragma: no cover - responses never read the request
    return {"type": "http.disconnect"}


def internal_error(rid: str) -> APIError:
    return APIError(500, f"internal server error (request id {rid}); the server log has the details",
                    "internal_error")


def create_app(config: ServerConfig, loader: Callable | None = None, ui: bool = True) -> Gate:
    """The server's ASGI app. ``loader(config) -> VLM`` replaces ``gracevlm.load`` (tests); ``ui=False``
    leaves out the web chat page (``GET /`` is then a 404)."""
    state = ServerState(config, loader)
    serving = Serving(state)

    @asynccontextmanager
    async def lifespan(_app):
        state.start_loading()  # returns at once: uvicorn binds the socket, /health says 503 until loaded
        try:
            yield
        finally:
            state.shutdown()

    api = FastAPI(title="gracevlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.url.path}; see GET /v1/models, POST /v1/chat/completions, "
                           "POST /v1/completions, GET /health, GET /metrics", "route_not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           "method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail), None)
        return err.response()

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return APIError(400, f"invalid request: {exc.errors()[:1]}", "invalid_value").response()

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return internal_error(getattr(request.state, "request_id", "?")).response()

    @api.get("/health")
    async def health():
        if state.ready:
            stats = state.scheduler.stats()
            kv = {k: stats[k] for k in ("kv_pool_bytes", "kv_pool_budget_bytes", "kv_cache_bytes", "prefix_cache_blocks")}
            return {"status": "ok", "model": config.model_name, "kv": kv}
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @api.get("/metrics")
    async def metrics():
        stats = state.scheduler.stats() if state.scheduler is not None else None
        return Response(state.metrics.render(stats, state.ready), media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [P.model_card(config.model_name, state.created)]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.check_model(model_id)
        return P.model_card(config.model_name, state.created)

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serving.chat(request)

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completions(request)

    if ui:
        def asset(name: str, media_type: str) -> Response:
            try:
                body = _ui_file(name)
            except OSError:
                raise APIError(404, f"the web page's file {name} is missing from this installation",
                               "ui_missing") from None
            return Response(body, media_type=media_type, headers=UI_HEADERS)

        @api.get("/", include_in_schema=False)
        async def index():
            return asset("index.html", "text/html; charset=utf-8")

        @api.get("/ui/{name}", include_in_schema=False)
        async def ui_asset(name: str):
            if name not in UI_ASSETS:
                raise StarletteHTTPException(404)
            return asset(name, UI_ASSETS[name])

    return Gate(api, state)
