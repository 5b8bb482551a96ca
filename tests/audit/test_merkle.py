"""RFC 9162 hashing, proofs and verifiers: published vectors, reference roots, exhaustive
small trees with one-bit corruption, and verifier fuzzing (only InvalidProof may escape)."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import merkle
from audit.merkle import InvalidProof, MemoryTree, leaf_hash, verify_consistency, verify_inclusion

VECTORS = Path(__file__).parent / "vectors" / "merkle" / "testdata"


def _b64(v: str | None) -> bytes:
    return base64.b64decode(v) if v else b""


def _cases(kind: str) -> list[tuple[str, dict]]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    return [(str(f.relative_to(VECTORS)), json.loads(f.read_text())) for f in files]


INCLUSION = _cases("inclusion")
CONSISTENCY = _cases("consistency")


def test_all_196_vectors_present() -> None:
    assert len(INCLUSION) + len(CONSISTENCY) == 196
    assert sum(not c["wantErr"] for _, c in INCLUSION + CONSISTENCY) >= 10


@pytest.mark.parametrize("name,case", INCLUSION, ids=[n for n, _ in INCLUSION])
def test_inclusion_vector(name: str, case: dict) -> None:
    proof = [_b64(p) for p in case["proof"] or []]
    args = (case["leafIdx"], case["treeSize"], _b64(case["leafHash"]), proof, _b64(case["root"]))
    if case["wantErr"]:
        with pytest.raises(InvalidProof):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("name,case", CONSISTENCY, ids=[n for n, _ in CONSISTENCY])
def test_consistency_vector(name: str, case: dict) -> None:
    proof = [_b64(p) for p in case["proof"] or []]
    args = (case["size1"], case["size2"], _b64(case["root1"]), _b64(case["root2"]), proof)
    if case["wantErr"]:
        with pytest.raises(InvalidProof):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


# RFC 6962 reference tree (certificate-transparency / transparency-dev testonly constants)
RFC6962_INPUTS = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43",
                  bytes(range(0x50, 0x58)), bytes(range(0x60, 0x70))]
RFC6962_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_rfc6962_reference_roots() -> None:
    assert merkle.root_hash(0, lambda ids: {}).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    tree = MemoryTree(leaf_hash(x) for x in RFC6962_INPUTS)
    for n, want in enumerate(RFC6962_ROOTS, start=1):
        assert tree.root(n).hex() == want
        assert merkle.root_from_leaves(leaf_hash(x) for x in RFC6962_INPUTS[:n]).hex() == want


def _mth(d: list[bytes]) -> bytes:
    """Textbook RFC 9162 2.1.1 recursion (independent of the node cache)."""
    if not d:
        return merkle.EMPTY_ROOT
    if len(d) == 1:
        return d[0]
    k = 1 << ((len(d) - 1).bit_length() - 1)
    return merkle.node_hash(_mth(d[:k]), _mth(d[k:]))


def _flips(proof: list[bytes]):
    for i, p in enumerate(proof):
        for bit in (0, 7, 8 * 31 + 5):  # a few bit positions per element keeps it fast
            q = bytearray(p)
            q[bit // 8] ^= 1 << (bit % 8)
            yield [*proof[:i], bytes(q), *proof[i + 1:]]


N = 64


@pytest.fixture(scope="module")
def tree() -> MemoryTree:
    return MemoryTree(leaf_hash(i.to_bytes(2, "big")) for i in range(N))


def test_exhaustive_inclusion_up_to_64(tree: MemoryTree) -> None:
    leaves = [tree.nodes[(0, i)] for i in range(N)]
    for n in range(1, N + 1):
        root = tree.root(n)
        assert root == _mth(leaves[:n])
        for m in range(n):
            proof = tree.inclusion_proof(m, n)
            verify_inclusion(m, n, leaves[m], proof, root)
            for bad in _flips(proof):
                with pytest.raises(InvalidProof):
                    verify_inclusion(m, n, leaves[m], bad, root)
            with pytest.raises(InvalidProof):
                verify_inclusion(m, n, leaves[(m + 1) % N], proof, root)
            if n > 1:
                with pytest.raises(InvalidProof):
                    verify_inclusion((m + 1) % n, n, leaves[m], proof, root)


def test_exhaustive_consistency_up_to_64(tree: MemoryTree) -> None:
    roots = [tree.root(n) for n in range(N + 1)]
    for n in range(1, N + 1):
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m, n)
            verify_consistency(m, n, roots[m], roots[n], proof)
            for bad in _flips(proof):
                with pytest.raises(InvalidProof):
                    verify_consistency(m, n, roots[m], roots[n], bad)
            if m < n:
                with pytest.raises(InvalidProof):
                    verify_consistency(m, n, roots[m - 1] if m > 1 else roots[n], roots[n], proof)
                with pytest.raises(InvalidProof):
                    verify_consistency(m, n, roots[m], roots[n - 1], proof)
                with pytest.raises(InvalidProof):
                    verify_consistency(m, n, roots[m], roots[n], proof[:-1])


_hash = st.binary(min_size=0, max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.integers(-3, 2**64), st.integers(-3, 2**64), _hash, st.lists(_hash, max_size=70), _hash)
def test_fuzz_inclusion_only_invalidproof(index, size, leaf, proof, root) -> None:
    try:
        verify_inclusion(index, size, leaf, proof, root)
    except InvalidProof:
        return
    pytest.fail("random inclusion proof verified")  # pragma: no cover


@settings(max_examples=300, deadline=None)
@given(st.integers(-3, 2**64), st.integers(-3, 2**64), _hash, _hash, st.lists(_hash, max_size=70))
def test_fuzz_consistency_only_invalidproof(old, new, r1, r2, proof) -> None:
    try:
        verify_consistency(old, new, r1, r2, proof)
    except InvalidProof:
        return
    # only the trivial case may pass: equal sizes, equal roots, empty proof
    assert old == new >= 0 and r1 == r2 and not proof
