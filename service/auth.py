"""Optional API key: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .errors import APIError

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <SAFL_API_KEY>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <SAFL_API_KEY>")


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the key's length.
    return hashlib.sha256(value.encode("utf-8")).digest()


def api_key_dependency(key: str, on_reject: Callable[[], None] | None = None) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that accepts only ``key``, compared in constant time."""
    expected = _digest(key)

    async def require_api_key(bearer: HTTPAuthorizationCredentials | None = Security(_bearer), header: str | None = Security(_header)) -> None:
        supplied = [c for c in ((bearer.credentials if bearer else None), header) if c]
        # Check every credential sent (no early exit), so timing does not say which one matched.
        ok = False
        for candidate in supplied:
            ok |= hmac.compare_digest(_digest(candidate), expected)
        if not ok:
            if on_reject:
                on_reject()
            raise APIError(
                "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"}
            )

    return require_api_key
