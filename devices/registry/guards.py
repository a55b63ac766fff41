"""What stands in front of the API and the web page (ASGI middleware), outermost first.

- Trusted proxies (uvicorn's ``ProxyHeadersMiddleware``): ``X-Forwarded-For``
  and ``X-Forwarded-Proto`` are believed only from the addresses in
  ``COMPRESSION_REGISTRY_TRUSTED_PROXIES``, so the client address (counted by
  the sign-in throttle) and the scheme (Secure cookies, HSTS) are the real ones
  behind the TLS proxy and cannot be forged by anyone else.
- :class:`SecurityHeaders`: Content-Security-Policy (``frame-ancestors 'none'``),
  X-Content-Type-Options, X-Frame-Options, Referrer-Policy on every answer, and
  Strict-Transport-Security when the request came over https; built with the
  ``secure`` library.
- :class:`BearerFirst`: an ``/api/`` request without a valid bearer token is
  answered 401 before a byte of its body is read.

The body size limit is FastAPI's own (``max_body_size``, Starlette's
``RequestBodyLimitMiddleware``): over ``COMPRESSION_REGISTRY_MAX_BODY_BYTES``
is 413, by the Content-Length before reading, or as soon as a chunked body
passes the limit.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, cast

import anyio
from secure import (
    ContentSecurityPolicy,
    ReferrerPolicy,
    Secure,
    StrictTransportSecurity,
    XContentTypeOptions,
    XFrameOptions,
)
from secure.middleware import SecureASGIMiddleware

from devices.registry.errors import ForbiddenError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_PATH: Final = "/api/"
DOCS_PATHS: Final = ("/docs", "/redoc")
HSTS_MAX_AGE_S: Final = 365 * 24 * 3600
# Swagger UI and ReDoc (only when COMPRESSION_REGISTRY_API_DOCS is on) load their scripts from this CDN, inline.
DOCS_CDN: Final = "https://cdn.jsdelivr.net"


def _headers(*, https: bool, docs: bool) -> Secure:
    csp = (ContentSecurityPolicy().default_src("'self'").frame_ancestors("'none'").form_action("'self'")
           .base_uri("'none'").object_src("'none'"))  # fmt: skip
    if docs:
        csp = (csp.script_src("'self'", "'unsafe-inline'", DOCS_CDN).style_src("'self'", "'unsafe-inline'", DOCS_CDN)
               .img_src("'self'", "data:", "https://fastapi.tiangolo.com"))  # fmt: skip
    return Secure(csp=csp, xcto=XContentTypeOptions(), xfo=XFrameOptions().deny(),
                  referrer=ReferrerPolicy().same_origin(),
                  hsts=StrictTransportSecurity().max_age(HSTS_MAX_AGE_S) if https else None)  # fmt: skip


class SecurityHeaders:
    """The security headers, HSTS only over https (``always_https``: the public URL is https, whatever the hop)."""

    def __init__(self, app: ASGIApp, always_https: bool = False) -> None:
        self._app = app
        self._always_https = always_https
        # SecureASGIMiddleware types ASGI loosely (object); it is an ASGI app like ours.
        self._variants = {(https, docs): cast(ASGIApp, SecureASGIMiddleware(app, secure=_headers(https=https,
                                                                                                 docs=docs)))
                          for https in (False, True) for docs in (False, True)}  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        https = self._always_https or scope.get("scheme") == "https"
        docs = str(scope.get("path", "")).startswith(DOCS_PATHS)
        await self._variants[(https, docs)](scope, receive, send)


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BearerFirst:
    """Authenticate ``/api/`` requests before anything reads their body; the actor goes to ``request.state``."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(API_PATH):
            await self._app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await _answer(send, 401, "missing bearer token (Authorization: Bearer <token>)",
                          {"WWW-Authenticate": "Bearer"})  # fmt: skip
            return
        registry = scope["app"].state.registry
        try:
            actor = await anyio.to_thread.run_sync(registry.authenticate, token.strip())
        except ForbiddenError as exc:
            await _answer(send, 401, str(exc), {"WWW-Authenticate": "Bearer"})
            return
        scope.setdefault("state", {})["actor"] = actor
        await self._app(scope, receive, send)
