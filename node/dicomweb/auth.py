"""Bearer tokens with scopes (store / read / audit / admin) and problem+json errors.

The config keeps the SHA-256 of each token (``synthnode tokens create`` makes one); a
request's token is hashed and compared in constant time. ``admin`` implies every scope.
Requests without a token get ``dicomweb.anonymous_scopes`` (empty by default: 401).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from config.sections.dicomweb import DicomwebSettings

__all__ = ["Principal", "Problem", "TokenStore", "new_token", "problem_response",
           "token_sha256"]

PROBLEM = "application/problem+json"


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh random token and its SHA-256 (what the config stores)."""
    tok = secrets.token_urlsafe(32)
    return tok, token_sha256(tok)


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``token:NAME`` or ``anonymous``, and what it may do."""

    name: str
    scopes: frozenset[str]
    address: str = ""

    @property
    def actor(self) -> str:
        return self.name

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class Problem(Exception):
    """An HTTP error answered as RFC 9457 problem+json."""

    def __init__(self, status: int, title: str, detail: str = "",
                 headers: dict[str, str] | None = None):
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail
        self.headers = headers or {}


def problem_response(p: Problem) -> JSONResponse:
    body = {"type": "about:blank", "title": p.title, "status": p.status}
    if p.detail:
        body["detail"] = p.detail
    return JSONResponse(body, status_code=p.status, media_type=PROBLEM, headers=p.headers)


class TokenStore:
    """The configured tokens, looked up by hash."""

    def __init__(self, settings: DicomwebSettings):
        self._by_hash: list[tuple[str, str, frozenset[str]]] = []
        for t in settings.tokens:
            digest = t.token_sha256 or token_sha256(
                t.token.get_secret_value() if t.token else "")
            self._by_hash.append((digest, t.name, frozenset(t.scopes)))
        self.anonymous = frozenset(settings.anonymous_scopes)
        self.oidc: Any = None  # node.dicomweb.oidc.OidcVerifier in OIDC mode
        if settings.oidc.enabled:
            from node.dicomweb.oidc import OidcVerifier

            self.oidc = OidcVerifier(settings.oidc)

    def principal(self, request: Request) -> Principal:
        """The request's principal; raises 401 for a missing or unknown token when
        anonymous access has no scopes, or for a malformed / unknown token always."""
        addr = request.client.host if request.client else ""
        header = request.headers.get("authorization")
        if not header:
            if self.anonymous:
                return Principal("anonymous", self.anonymous, addr)
            raise Problem(401, "Unauthorized", "a bearer token is required",
                          {"WWW-Authenticate": 'Bearer realm="synthnode"'})
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Problem(401, "Unauthorized", "use the Bearer authorization scheme",
                          {"WWW-Authenticate": 'Bearer realm="synthnode"'})
        digest = token_sha256(value.strip())
        found: tuple[str, frozenset[str]] | None = None
        for h, name, scopes in self._by_hash:
            if hmac.compare_digest(h, digest):
                found = (name, scopes)
        if found is None and self.oidc is not None and value.count(".") == 2:
            return self._jwt(value.strip(), addr)
        if found is None:
            raise Problem(401, "Unauthorized", "unknown token",
                          {"WWW-Authenticate": 'Bearer realm="synthnode", error="invalid_token"'})
        return Principal(f"token:{found[0]}", found[1], addr)

    def _jwt(self, token: str, addr: str) -> Principal:
        from node.dicomweb.oidc import JwtError

        assert self.oidc is not None
        try:
            claims = self.oidc.verify(token)
        except JwtError as exc:
            raise Problem(401, "Unauthorized", f"invalid token: {exc}",
                          {"WWW-Authenticate": 'Bearer realm="synthnode", '
                                               'error="invalid_token"'}) from None
        return Principal(self.oidc.name(claims), self.oidc.scopes(claims), addr)

    def require(self, request: Request, scope: str) -> Principal:
        p = self.principal(request)
        if not p.allows(scope) and p.name == "anonymous":
            raise Problem(401, "Unauthorized", f"a bearer token with the '{scope}' scope is "
                          "required", {"WWW-Authenticate": 'Bearer realm="synthnode"'})
        if not p.allows(scope):
            raise Problem(403, "Forbidden", f"this token lacks the '{scope}' scope",
                          {"WWW-Authenticate":
                           f'Bearer realm="synthnode", error="insufficient_scope", '
                           f'scope="{scope}"'})
        return p
