"""OIDC mode: bearer JWTs (RFC 7519) checked against a JWKS file (RFC 7517) and mapped to
scopes. Signatures RS256 / RS384 / RS512, PS256, ES256 / ES384, EdDSA (Ed25519) with the
``cryptography`` package; ``exp`` / ``nbf`` / ``iss`` / ``aud`` checked.

The identity provider's keys are read from a file (``dicomweb.oidc.jwks_file``): the node
never fetches anything at request time. Claims map to scopes through
``dicomweb.oidc.scope_map`` (claim value -> scopes), read from ``scope_claim`` (an OAuth
``scope`` string or a list claim such as ``roles``).
"""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from config.sections.dicomweb import OidcSettings

__all__ = ["JwtError", "OidcVerifier"]


class JwtError(ValueError):
    pass


def _b64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _int(s: str) -> int:
    return int.from_bytes(_b64(s), "big")


def _hash(bits: str) -> hashes.HashAlgorithm:
    return {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[bits]


def _public_key(jwk: dict[str, Any]) -> Any:
    kty = jwk.get("kty")
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key()
    if kty == "EC":
        curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}[jwk["crv"]]
        return ec.EllipticCurvePublicNumbers(_int(jwk["x"]), _int(jwk["y"]),
                                             curve).public_key()
    if kty == "OKP" and jwk.get("crv") == "Ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(_b64(jwk["x"]))
    raise JwtError(f"unsupported key type {kty}")


def _verify(alg: str, key: Any, sig: bytes, data: bytes) -> None:
    try:
        if alg.startswith("RS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, data, padding.PKCS1v15(), _hash(alg[2:]))
        elif alg.startswith("PS") and isinstance(key, rsa.RSAPublicKey):
            h = _hash(alg[2:])
            key.verify(sig, data, padding.PSS(padding.MGF1(h), h.digest_size), h)
        elif alg.startswith("ES") and isinstance(key, ec.EllipticCurvePublicKey):
            n = len(sig) // 2
            der = encode_dss_signature(int.from_bytes(sig[:n], "big"),
                                       int.from_bytes(sig[n:], "big"))
            key.verify(der, data, ec.ECDSA(_hash(alg[2:])))
        elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        else:
            raise JwtError(f"algorithm {alg} does not fit the key")
    except (InvalidSignature, KeyError):
        raise JwtError("bad signature") from None


class OidcVerifier:
    """Checks JWTs against the configured JWKS file and maps their claims to scopes."""

    def __init__(self, cfg: OidcSettings):
        self.cfg = cfg
        if cfg.jwks_file is None:
            raise ValueError("dicomweb.oidc.jwks_file is required in OIDC mode")
        jwks = json.loads(Path(cfg.jwks_file).read_text())
        self.keys: list[tuple[str | None, Any]] = []
        for jwk in jwks.get("keys", []):
            if jwk.get("use", "sig") == "sig":
                self.keys.append((jwk.get("kid"), _public_key(jwk)))

    def verify(self, token: str, now: float | None = None) -> dict[str, Any]:
        """The token's claims; raises :class:`JwtError` naming what is wrong."""
        try:
            h64, p64, s64 = token.split(".")
            header = json.loads(_b64(h64))
            claims = json.loads(_b64(p64))
            sig = _b64(s64)
        except ValueError:
            raise JwtError("malformed token") from None
        alg = str(header.get("alg", ""))
        if alg not in self.cfg.algorithms:
            raise JwtError(f"algorithm {alg or 'none'} not allowed")
        kid = header.get("kid")
        keys = [k for i, k in self.keys if kid is None or i in (None, kid)]
        if not keys:
            raise JwtError("no key with this kid")
        last: JwtError | None = None
        for key in keys:
            try:
                _verify(alg, key, sig, f"{h64}.{p64}".encode("ascii"))
                break
            except JwtError as exc:
                last = exc
        else:
            raise last or JwtError("bad signature")
        self._check_claims(claims, time.time() if now is None else now)
        return dict(claims)

    def _check_claims(self, c: dict[str, Any], now: float) -> None:
        leeway = self.cfg.leeway_s
        if "exp" not in c or not isinstance(c["exp"], int | float):
            raise JwtError("no exp claim")
        if now > c["exp"] + leeway:
            raise JwtError("token expired")
        if isinstance(c.get("nbf"), int | float) and now + leeway < c["nbf"]:
            raise JwtError("token not yet valid")
        if self.cfg.issuer and c.get("iss") != self.cfg.issuer:
            raise JwtError("wrong issuer")
        if self.cfg.audience:
            aud = c.get("aud")
            auds = aud if isinstance(aud, list) else [aud]
            if self.cfg.audience not in auds:
                raise JwtError("wrong audience")

    def scopes(self, claims: dict[str, Any]) -> frozenset[str]:
        raw = claims.get(self.cfg.scope_claim)
        values = raw.split() if isinstance(raw, str) else [str(v) for v in raw or []]
        out: set[str] = set()
        for v in values:
            out.update(self.cfg.scope_map.get(v, []))
        return frozenset(out)

    def name(self, claims: dict[str, Any]) -> str:
        return f"oidc:{claims.get(self.cfg.name_claim) or claims.get('sub') or '?'}"
