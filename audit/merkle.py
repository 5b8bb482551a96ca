"""RFC 9162 (RFC 6962) Merkle tree hashing, proofs and verifiers.

Hashing (RFC 9162 2.1.1): ``MTH({}) = SHA-256("")``, leaf ``SHA-256(0x00 || d)``, interior
node ``SHA-256(0x01 || left || right)``; an n-leaf tree splits at the largest power of two
strictly below n.

Storage model: the hash of every *complete aligned subtree* is addressed by
``(level, idx)``: it covers leaves ``[idx * 2**level, (idx + 1) * 2**level)``. Any subtree
that the RFC recursion visits starts at an aligned position, so its hash folds from at most
``log2 n`` such complete subtrees; proofs therefore need O(log n) stored hashes
(see :func:`inclusion_proof` / :func:`consistency_proof`, which take a ``fetch`` callback).

Verifiers follow RFC 9162 2.1.3.2 and 2.1.4.2 literally and raise :class:`InvalidProof`
(and nothing else) on any failure.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
NodeId = tuple[int, int]  # (level, idx)
Fetch = Callable[[set[NodeId]], dict[NodeId, bytes]]

EMPTY_ROOT = hashlib.sha256(b"").digest()


class InvalidProof(Exception):
    """A proof, root or checkpoint does not verify (the only error verifiers raise)."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 2.1.1: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 2.1.1: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


# -- compact range (frontier) -------------------------------------------------------------
def frontier_append(frontier: list[bytes], size: int, leaf: bytes) -> list[tuple[int, int, bytes]]:
    """Append leaf hash ``leaf`` as leaf number ``size``; update ``frontier`` in place.

    ``frontier`` holds the hashes of the complete subtrees on the right edge of a
    ``size``-leaf tree, largest first (one per set bit of ``size``). Returns the complete
    subtrees (``level >= 1``) this leaf completes, as ``(level, idx, hash)``.
    """
    created: list[tuple[int, int, bytes]] = []
    carry = leaf
    level = 0
    while (size >> level) & 1:
        carry = node_hash(frontier.pop(), carry)
        level += 1
        created.append((level, size >> level, carry))
    frontier.append(carry)
    return created


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """Root hash of the tree whose right-edge frontier is ``frontier``."""
    if not frontier:
        return EMPTY_ROOT
    h = frontier[-1]
    for f in reversed(frontier[:-1]):
        h = node_hash(f, h)
    return h


def pack_frontier(frontier: Sequence[bytes]) -> bytes:
    return b"".join(frontier)


def unpack_frontier(blob: bytes, size: int) -> list[bytes]:
    out = [bytes(blob[i : i + HASH_SIZE]) for i in range(0, len(blob), HASH_SIZE)]
    if len(out) != bin(size).count("1") or len(blob) % HASH_SIZE:
        raise ValueError(f"ledger head frontier has {len(out)} hashes for size {size}")
    return out


def frontier_ids(size: int) -> list[NodeId]:
    """Node ids of the frontier of a ``size``-leaf tree, largest first."""
    ids: list[NodeId] = []
    lo = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            ids.append((level, lo >> level))
            lo += 1 << level
    return ids


def root_from_leaves(leaves: Iterable[bytes]) -> bytes:
    """Root of a tree given leaf hashes (streaming, O(log n) memory)."""
    frontier: list[bytes] = []
    n = 0
    for leaf in leaves:
        frontier_append(frontier, n, leaf)
        n += 1
    return frontier_root(frontier)


# -- proofs over stored complete subtrees -------------------------------------------------
def _range_ids(lo: int, hi: int) -> list[NodeId]:
    """Decompose the aligned range ``[lo, hi)`` into complete subtrees, left to right."""
    ids: list[NodeId] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        while lo & ((1 << level) - 1):  # defensive: keep pieces aligned
            level -= 1
        ids.append((level, lo >> level))
        lo += 1 << level
    return ids


def _fold(ids: list[NodeId], nodes: dict[NodeId, bytes]) -> bytes:
    h = nodes[ids[-1]]
    for nid in reversed(ids[:-1]):
        h = node_hash(nodes[nid], h)
    return h


def _path_ranges(m: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """RFC 9162 2.1.3.1 PATH(m, D[lo:hi]) as the list of subtree ranges, leaf-first."""
    out: list[tuple[int, int]] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, m = lo + k, m - k
    out.reverse()
    return out


def _subproof_ranges(m: int, lo: int, hi: int, b: bool) -> list[tuple[int, int]]:
    """RFC 9162 2.1.4.1 SUBPROOF(m, D[lo:hi], b) as subtree ranges, in proof order."""
    out: list[tuple[int, int]] = []
    while True:
        n = hi - lo
        if m == n:
            if not b:
                out.append((lo, hi))
            break
        k = _split(n)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, m, b = lo + k, m - k, False
    out.reverse()
    return out


def _resolve(ranges: list[tuple[int, int]], fetch: Fetch) -> list[bytes]:
    decomposed = [_range_ids(lo, hi) for lo, hi in ranges]
    wanted = {nid for ids in decomposed for nid in ids}
    nodes = fetch(wanted) if wanted else {}
    missing = wanted - nodes.keys()
    if missing:
        raise LookupError(f"node cache is missing {sorted(missing)[:4]}")
    return [_fold(ids, nodes) for ids in decomposed]


def inclusion_proof(index: int, size: int, fetch: Fetch) -> list[bytes]:
    """Audit path for leaf ``index`` in the tree of ``size`` leaves (RFC 9162 2.1.3.1)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} not in tree of size {size}")
    return _resolve(_path_ranges(index, 0, size), fetch)


def consistency_proof(old: int, new: int, fetch: Fetch) -> list[bytes]:
    """Consistency proof between tree sizes ``old`` and ``new`` (RFC 9162 2.1.4.1)."""
    if not 0 < old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    if old == new:
        return []
    return _resolve(_subproof_ranges(old, 0, new, True), fetch)


def root_hash(size: int, fetch: Fetch) -> bytes:
    """Root of the first ``size`` leaves from stored complete subtrees."""
    if size == 0:
        return EMPTY_ROOT
    return _resolve([(0, size)], fetch)[0]


# -- verifiers ---------------------------------------------------------------------------
def _check_hash(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        raise InvalidProof(f"{name} is not a {HASH_SIZE}-byte hash")
    return bytes(value)


def _inner_border(index: int, size: int) -> tuple[int, int]:
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 2.1.3.2 steps 1-4: the root implied by an inclusion proof."""
    if not isinstance(index, int) or not isinstance(size, int) or index < 0 or size < 0:
        raise InvalidProof("index and size must be non-negative integers")
    if index >= size:
        raise InvalidProof(f"leaf index {index} is beyond tree size {size}")
    leaf = _check_hash("leaf hash", leaf)
    inner, border = _inner_border(index, size)
    if len(proof) != inner + border:
        raise InvalidProof(f"wrong proof size {len(proof)}, want {inner + border}")
    fn, sn, r = index, size - 1, leaf
    for i, p in enumerate(proof):
        p = _check_hash(f"proof element {i}", p)
        if sn == 0:
            raise InvalidProof("proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("proof is too short")
    return r


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Verify that ``leaf`` is leaf ``index`` of the tree ``(size, root)`` (RFC 9162 2.1.3.2).

    Raises
    ------
    InvalidProof
        on any failure.
    """
    root = _check_hash("root hash", root)
    got = root_from_inclusion_proof(index, size, leaf, proof)
    if got != root:
        raise InvalidProof(f"inclusion proof for leaf {index} yields a different root")


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Verify that tree ``(old, old_root)`` is a prefix of ``(new, new_root)`` (RFC 9162 2.1.4.2).

    Raises
    ------
    InvalidProof
        on any failure (including ``old == 0``, ``old > new``, a non-empty proof for equal
        sizes and a wrong proof length).
    """
    if not isinstance(old, int) or not isinstance(new, int) or old < 0 or new < 0:
        raise InvalidProof("sizes must be non-negative integers")
    if new < old:
        raise InvalidProof(f"size {new} is smaller than {old}")
    if old == new:
        _verify_equal_sizes(old, old_root, new_root, proof)
        return
    old_root = _check_hash("old root", old_root)
    new_root = _check_hash("new root", new_root)
    if old == 0:
        raise InvalidProof("no consistency proof from an empty tree")
    if not proof:
        raise InvalidProof("empty consistency proof")
    path = _consistency_path(old, new, old_root, proof)
    fr, sr = _consistency_roots(old, new, path)
    if fr != old_root:
        raise InvalidProof(f"consistency proof does not match the root of size {old}")
    if sr != new_root:
        raise InvalidProof(f"consistency proof does not match the root of size {new}")


def _verify_equal_sizes(size: int, old_root: bytes, new_root: bytes,
                        proof: Sequence[bytes]) -> None:
    """:func:`verify_consistency` of a tree with itself: an empty proof and equal roots."""
    if proof:
        raise InvalidProof("equal sizes need an empty proof")
    if old_root != new_root:
        raise InvalidProof("equal sizes with different roots")
    if size == 0 and old_root != EMPTY_ROOT:
        raise InvalidProof("the root of an empty tree is SHA-256 of the empty string")


def _consistency_path(old: int, new: int, old_root: bytes, proof: Sequence[bytes]) -> list[bytes]:
    """The checked proof hashes (``old_root`` first when ``old`` is a power of two); refuses a
    proof of the wrong length."""
    # expected length (transparency-dev/merkle proof/verify.go)
    shift = (old & -old).bit_length() - 1  # trailing zeros of old
    inner, border = _inner_border(old - 1, new)
    inner -= shift
    start = 0 if old == 1 << shift else 1
    want = start + inner + border
    path = [_check_hash(f"proof element {i}", p) for i, p in enumerate(proof)]
    if len(path) != want:
        raise InvalidProof(f"wrong proof size {len(path)}, want {want}")
    if old & (old - 1) == 0:  # exact power of two: prepend first hash
        path = [old_root, *path]
    return path


def _consistency_roots(old: int, new: int, path: list[bytes]) -> tuple[bytes, bytes]:
    """The roots of sizes ``old`` and ``new`` that ``path`` yields (RFC 9162 2.1.4.2)."""
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidProof("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("consistency proof is too short")
    return fr, sr


class MemoryTree:
    """An in-memory tree with the same node layout as the database (tests and tools)."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.nodes: dict[NodeId, bytes] = {}
        self.frontier: list[bytes] = []
        self.size = 0
        for leaf in leaves:
            self.append(leaf)

    def append(self, leaf: bytes) -> int:
        self.nodes[(0, self.size)] = leaf
        for level, idx, h in frontier_append(self.frontier, self.size, leaf):
            self.nodes[(level, idx)] = h
        self.size += 1
        return self.size - 1

    def fetch(self, ids: set[NodeId]) -> dict[NodeId, bytes]:
        return {i: self.nodes[i] for i in ids if i in self.nodes}

    def root(self, size: int | None = None) -> bytes:
        return root_hash(self.size if size is None else size, self.fetch)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return inclusion_proof(index, self.size if size is None else size, self.fetch)

    def consistency_proof(self, old: int, new: int | None = None) -> list[bytes]:
        return consistency_proof(old, self.size if new is None else new, self.fetch)
