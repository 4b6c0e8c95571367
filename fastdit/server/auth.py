"""Access control, as other OpenAI-compatible servers do it: with an API key (`fastdit serve --api-key KEY`, or
the FASTDIT_API_KEY environment variable) every /v1/* request needs `Authorization: Bearer KEY`, which the
official client sends for its `api_key=`. Without it the answer is OpenAI's 401. /health, /metrics and the web
page stay open (the page asks for the key and sends it). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac

from fastdit.server.schema import ApiError

PROTECTED_PREFIX = "/v1/"


class ApiKeyGuard:
    """Pure ASGI middleware: answers 401 to a /v1/* request without the right bearer token, before its body is
    read."""

    def __init__(self, app, *, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = (
                    "Incorrect API key provided." if token else "You didn't provide an API key."
                ) + " Send it as 'Authorization: Bearer KEY' (the key the server was started with)."
                error = ApiError(
                    401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="fastdit"'}
                )
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)
