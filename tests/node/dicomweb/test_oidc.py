"""OIDC mode: JWTs signed by a test identity provider's keys (RSA and Ed25519), checked
against its JWKS file; claims mapped to scopes; expired / wrong issuer / wrong audience /
forged tokens refused with 401 problem+json."""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from tests.support.dimse import ledger_events


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _uint(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def _jwt(claims: dict[str, Any], key: Any, alg: str, kid: str) -> str:
    head = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims).encode())
    data = f"{head}.{body}".encode()
    if alg == "RS256":
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = key.sign(data)
    return f"{head}.{body}.{_b64(sig)}"


def test_jwts_map_claims_to_scopes(web_factory: Any, tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    pub = rsa_key.public_key().public_numbers()
    ed_x = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    jwks = {"keys": [{"kty": "RSA", "kid": "r1", "n": _uint(pub.n), "e": _uint(pub.e)},
                     {"kty": "OKP", "crv": "Ed25519", "kid": "e1", "x": _b64(ed_x)}]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    web = web_factory(oidc={
        "enabled": True, "jwks_file": str(tmp_path / "jwks.json"),
        "issuer": "https://idp.example", "audience": "synthnode",
        "scope_map": {"pacs.read": ["read"], "pacs.write": ["store"]}})
    now = int(time.time())
    good = {"iss": "https://idp.example", "aud": "synthnode", "sub": "dr.who",
            "exp": now + 300, "scope": "openid pacs.read"}

    def get(token: str) -> httpx.Response:
        return httpx.get(web.url + "/studies", headers={"Authorization": f"Bearer {token}"})

    assert get(_jwt(good, rsa_key, "RS256", "r1")).status_code == 200
    assert get(_jwt(good, ed_key, "EdDSA", "e1")).status_code == 200
    # claims without the read value: authenticated but not allowed
    assert get(_jwt({**good, "scope": "pacs.write"}, rsa_key, "RS256", "r1")).status_code == 403
    for bad, why in [({**good, "exp": now - 3600}, "expired"),
                     ({**good, "iss": "https://evil.example"}, "issuer"),
                     ({**good, "aud": "other"}, "audience")]:
        r = get(_jwt(bad, rsa_key, "RS256", "r1"))
        assert r.status_code == 401 and why in r.json()["detail"], r.text
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    r = get(_jwt(good, other, "RS256", "r1"))  # forged: signed by a key not in the JWKS
    assert r.status_code == 401 and "signature" in r.json()["detail"]
    body = _jwt(good, rsa_key, "RS256", "r1").split(".")[1]
    none = _b64(json.dumps({"alg": "none"}).encode())
    assert get(f"{none}.{body}.").status_code == 401  # alg none refused
    web.flush()
    assert [e.actor for e in ledger_events(web.node, "query")] == ["oidc:dr.who"] * 2
