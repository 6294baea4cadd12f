"""Optional API key: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers

from .errors import APIError

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <SAFL_API_KEY>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <SAFL_API_KEY>")


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the key's length.
    return hashlib.sha256(value.encode("utf-8")).digest()


def credentials(headers: Headers) -> list[str]:
    """The credentials a request sends: the token of every ``Authorization: Bearer`` header
    and every ``X-API-Key`` header, repeated headers included (other schemes are not ours)."""
    found = []
    for value in headers.getlist("authorization"):
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer":
            found.append(token.strip())
    found += [value.strip() for value in headers.getlist("x-api-key")]
    return found


def api_key_dependency(key: str, on_reject: Callable[[], None] | None = None) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that accepts only ``key``, compared in constant time."""
    expected = _digest(key)

    # The two Security parameters document the schemes in OpenAPI; the check reads every
    # header itself, since they would each see only the first of repeated headers.
    async def require_api_key(
        request: Request, bearer: HTTPAuthorizationCredentials | None = Security(_bearer), header: str | None = Security(_header)
    ) -> None:
        supplied = credentials(request.headers)
        # Every credential sent must be the key: with two that differ, which one a proxy or
        # a framework would have used is a guess. Each is checked (no early exit), so
        # timing does not say which one matched.
        ok = bool(supplied)
        for candidate in supplied:
            ok &= hmac.compare_digest(_digest(candidate), expected)
        if not ok:
            if on_reject:
                on_reject()
            raise APIError(
                "unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' (every credential sent must be the key)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_api_key
