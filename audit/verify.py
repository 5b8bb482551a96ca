"""Offline ledger verification (fsck): re-derive every hash and root, check checkpoints.

Needs only the database URL (or an export file) and the log's public verifier key::

    python -m audit.verify --db sqlite:///var/index.db --pubkey ledger.vkey \\
        [--checkpoints var/checkpoints.log]
    python -m audit.verify --export ledger.jsonl --pubkey ledger.vkey

Checks, in order: entries are numbered 0..n-1 without gaps; every leaf hash is
``SHA-256(0x00 || data)`` of its stored data; every stored node of the cache equals the hash
re-derived from the leaves (and none is missing or extra); the head row's size and frontier
match; every stored checkpoint is signed by the key and its root equals the re-derived root
at its size; every note in the external checkpoint file verifies, never two roots for one
size, never a size beyond the ledger (truncation), and every database checkpoint is in the
file. Problems name the first bad entry (or the smallest entry range that must contain it).
Exit status: 0 clean, 1 problems found, 2 usage error.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit import merkle
from audit.checkpoint import (
    Checkpoint,
    InvalidCheckpoint,
    Verifier,
    load_verifier,
    open_checkpoint,
    read_checkpoint_file,
)

EXPORT_FORMAT = "synthnode-ledger-export"
MAX_PROBLEMS = 50


@dataclass(frozen=True)
class Problem:
    """One finding. ``seq`` is the first entry concerned; ``last`` the end of a range."""

    kind: str
    message: str
    seq: int | None = None
    last: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.seq is not None:
            where = (
                f"entry {self.seq}"
                if self.last in (None, self.seq)
                else f"entries {self.seq}..{self.last}"
            )
            where += ": "
        return f"[{self.kind}] {where}{self.message}"


@dataclass
class Report:
    size: int = 0
    root: bytes = merkle.EMPTY_ROOT
    checkpoints: int = 0
    file_checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, p: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(p)

    def sort(self) -> None:
        """Most precise finding first: single entries, then the narrowest entry ranges."""
        def key(p: Problem) -> tuple[bool, int, int]:
            if p.seq is None:
                return (True, 0, 0)
            return (False, (p.last if p.last is not None else p.seq) - p.seq, p.seq)

        self.problems.sort(key=key)

    @property
    def first_bad_entry(self) -> int | None:
        """The entry the most precise finding names (start of its range)."""
        for p in self.problems:
            if p.seq is not None:
                return p.seq
        return None

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "size": self.size, "root": self.root.hex(),
                "checkpoints": self.checkpoints, "file_checkpoints": self.file_checkpoints,
                "first_bad_entry": self.first_bad_entry, "elapsed_s": round(self.elapsed_s, 3),
                "problems": [str(p) for p in self.problems]}


class _Levels:
    """All complete-subtree hashes re-derived from the leaves, one bytearray per level."""

    def __init__(self, leaves: bytearray) -> None:
        self.levels = [leaves]
        cur = leaves
        sha = hashlib.sha256
        while len(cur) >= 64:
            mv = memoryview(cur)
            nxt = bytearray(b"".join([sha(b"\x01" + mv[i:i + 64]).digest()
                                      for i in range(0, len(cur) - 63, 64)]))
            self.levels.append(nxt)
            cur = nxt

    @property
    def size(self) -> int:
        return len(self.levels[0]) // 32

    def get(self, level: int, idx: int) -> bytes | None:
        if level >= len(self.levels):
            return None
        lv = self.levels[level]
        if (idx + 1) * 32 > len(lv):
            return None
        return bytes(lv[idx * 32:(idx + 1) * 32])

    def fetch(self, ids: set[merkle.NodeId]) -> dict[merkle.NodeId, bytes]:
        return {i: h for i in ids if (h := self.get(*i)) is not None}

    def root(self, size: int) -> bytes:
        return merkle.root_hash(size, self.fetch)

    def count(self, level: int) -> int:
        return len(self.levels[level]) // 32 if level < len(self.levels) else 0


Batch = Sequence[tuple[int, bytes, bytes]]


def _check_leaves(batches: Iterable[Batch], report: Report) -> bytearray:
    """Re-hash every leaf; batches of ``(seq, leaf_hash, data)`` in sequence order."""
    leaves = bytearray()
    expected = 0
    sha = hashlib.sha256
    for batch in batches:
        if not batch:
            continue
        computed = [sha(b"\x00" + r[2]).digest() for r in batch]
        first, last = int(batch[0][0]), int(batch[-1][0])
        joined = b"".join(computed)
        if first == expected and last - first == len(batch) - 1:
            if b"".join(bytes(r[1]) for r in batch) != joined:
                for r, lh in zip(batch, computed, strict=True):
                    if bytes(r[1]) != lh:
                        report.add(
                            Problem(
                                "leaf", "stored leaf hash does not match the entry data", int(r[0])
                            )
                        )
            leaves += joined
            expected = last + 1
            continue
        # slow path: a gap or disorder in this batch
        for r, lh in zip(batch, computed, strict=True):
            seq = int(r[0])
            if seq != expected:
                if seq > expected:
                    report.add(
                        Problem(
                            "missing",
                            f"entries {expected}..{seq - 1} are missing",
                            expected,
                            seq - 1,
                        )
                    )
                else:
                    report.add(Problem("order", f"entry {seq} appears out of order", seq))
                expected = seq
            if bytes(r[1]) != lh:
                report.add(Problem("leaf", "stored leaf hash does not match the entry data", seq))
            leaves += lh
            expected += 1
    return leaves


def _check_checkpoint_notes(notes: list[tuple[str, str]], verifier: Verifier, levels: _Levels,
                            report: Report) -> dict[int, bytes]:
    """Verify signed notes; returns ``{size: root}``; ``notes`` are ``(where, note)``."""
    by_size: dict[int, bytes] = {}
    prev_good = 0
    last_size = -1
    for where, note in notes:
        try:
            cp = open_checkpoint(note, verifier, verifier.name)
        except InvalidCheckpoint as exc:
            report.add(Problem("checkpoint", f"{where}: {exc}"))
            continue
        if cp.size in by_size and by_size[cp.size] != cp.root:
            report.add(Problem("fork", f"{where}: two different roots signed for size {cp.size}"))
        if cp.size < last_size:
            report.add(
                Problem("checkpoint", f"{where}: size {cp.size} signed after size {last_size}")
            )
        last_size = max(last_size, cp.size)
        by_size[cp.size] = cp.root
        if cp.size > levels.size:
            report.add(
                Problem(
                    "truncated",
                    f"{where}: checkpoint of size {cp.size} but the ledger has "
                    f"{levels.size} entries (entries deleted)",
                    levels.size,
                    cp.size - 1,
                )
            )
            continue
        if levels.root(cp.size) != cp.root:
            report.add(
                Problem(
                    "rewritten",
                    f"{where}: root at size {cp.size} differs from the signed "
                    "checkpoint (an entry in this range was changed)",
                    prev_good,
                    cp.size - 1,
                )
            )
        else:
            prev_good = max(prev_good, cp.size)
    return by_size


def _check_nodes(levels: _Levels, nodes: Callable[[int, int, bool], Sequence[Any]],
                 report: Report) -> None:
    """Compare the stored complete-subtree hashes (``nodes(level, count, with_idx)``) with the
    ones re-derived from the entries."""
    for level in range(1, len(levels.levels)):
        want = levels.levels[level]
        count = len(want) // 32
        # (level, idx) is the primary key and the query asks for idx < count, so count
        # rows means exactly the indexes 0..count-1: only hashes need to come back
        hashes = nodes(level, count, False)
        if len(hashes) == count and b"".join(hashes) == want:
            continue
        have = {int(r[0]): bytes(r[1]) for r in nodes(level, count, True)}
        for idx in range(count):
            lo, hi = idx << level, ((idx + 1) << level) - 1
            h = have.get(idx)
            if h is None:
                report.add(
                    Problem("node", f"node (level {level}, index {idx}) is missing", lo, hi)
                )
            elif h != want[idx * 32:(idx + 1) * 32]:
                report.add(
                    Problem(
                        "node",
                        f"stored node (level {level}, index {idx}) does not match "
                        "the hash of these entries",
                        lo,
                        hi,
                    )
                )


def _check_head(levels: _Levels, head: tuple[int, bytes], report: Report) -> None:
    """Compare the stored head (size, frontier) with the entries."""
    n = levels.size
    hsize, frontier = head
    if hsize != n:
        report.add(Problem("head", f"head says {hsize} entries, found {n}", min(hsize, n)))
    else:
        want = b"".join(levels.get(lv, i) or b"" for lv, i in merkle.frontier_ids(n))
        if frontier != want:
            report.add(Problem("head", "head frontier does not match the entries"))


def _verify(rows: Iterable[Batch], verifier: Verifier,
            db_notes: list[tuple[int, bytes, str]], file_notes: list[str] | None, report: Report,
            nodes: Callable[[int, int, bool], Sequence[Any]] | None = None,
            head: tuple[int, bytes] | None = None) -> Report:
    levels = _Levels(_check_leaves(rows, report))
    n = levels.size
    report.size = n
    report.root = levels.root(n)
    if nodes is not None:
        _check_nodes(levels, nodes, report)
    if head is not None:
        _check_head(levels, head, report)
    db = _check_checkpoint_notes([(f"database checkpoint {s}", note) for s, _, note in db_notes],
                                 verifier, levels, report)
    for s, root, _ in db_notes:
        if db.get(s) not in (None, root):
            report.add(
                Problem("checkpoint", f"database checkpoint {s}: root column differs from its note")
            )
    report.checkpoints = len(db_notes)
    if file_notes is not None:
        fsigned = _check_checkpoint_notes(
            [(f"checkpoint file note {i + 1}", t) for i, t in enumerate(file_notes)],
            verifier,
            levels,
            report,
        )
        report.file_checkpoints = len(file_notes)
        for s, root in db.items():
            if s not in fsigned:
                report.add(
                    Problem("checkpoint", f"database checkpoint {s} is not in the checkpoint file")
                )
            elif fsigned[s] != root:
                report.add(Problem("fork", f"database and file disagree on the root of size {s}"))
    report.sort()
    return report


def verify_database(engine, verifier: Verifier, checkpoint_file: Path | None = None,  # type: ignore[no-untyped-def]
                    batch: int = 50000, deep: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> Report:
    """Verify the ledger stored in ``engine``'s database (see module docs).

    ``deep`` also parses every leaf (it must be a canonical event) and checks the derived
    UID index (``ledger_refs``) against the leaves, so ``audit query`` / ``lineage`` cannot
    be made to miss an entry (slower: one JSON parse per entry).

    Safe to run while the node appends: stored checkpoints are read first, then the
    external file (every stored checkpoint was written there before its row committed),
    then the head; entries and nodes beyond the head's size are checked against the head
    read again at the end.
    """
    from sqlalchemy import func, select

    from audit.tables import ledger_checkpoints, ledger_entries, ledger_head

    t0 = time.perf_counter()
    report = Report()
    e, c, h = ledger_entries.c, ledger_checkpoints.c, ledger_head.c
    tell = progress or (lambda phase, done, total: None)
    with engine.connect() as conn:
        db_notes = [(int(r.size), bytes(r.root_hash), r.note)
                    for r in conn.execute(select(c.size, c.root_hash, c.note).order_by(c.size))]
        file_notes = None
        junk: list[str] = []
        if checkpoint_file is not None:
            file_notes, junk = read_checkpoint_file(checkpoint_file)
        head_row = conn.execute(select(h.size, h.frontier).where(h.id == 1)).first()
        if head_row is None:
            report.add(Problem("head", "ledger head row is missing"))
            head = None
            limit = None
        else:
            head = (int(head_row.size), bytes(head_row.frontier))
            limit = head[0]
        dbapi = conn.connection.driver_connection
        pg = conn.dialect.name == "postgresql"
        ph = "%s" if pg else "?"
        bound = limit if limit is not None else 2**62

        def cursor():  # type: ignore[no-untyped-def]
            if pg:  # server-side cursor: stream without loading everything
                return dbapi.cursor(name=f"verify_{time.monotonic_ns()}")
            return dbapi.cursor()

        total = limit or 0

        def entry_batches() -> Iterator[Batch]:
            cur = cursor()
            done = 0
            tell("entries", 0, total)
            try:
                cur.execute(
                    "SELECT seq, leaf_hash, data FROM ledger_entries "
                    f"WHERE seq < {ph} ORDER BY seq",
                    (bound,),
                )
                while True:
                    rows = cur.fetchmany(batch)
                    if not rows:
                        break
                    yield rows
                    done += len(rows)
                    tell("entries", done, total)
            finally:
                cur.close()
            tell("tree nodes, head and checkpoints", done, total)

        def node_rows(level: int, count: int, with_idx: bool) -> Sequence[Any]:
            cur = cursor()
            cols = "idx, hash" if with_idx else "hash"
            try:
                cur.execute(
                    f"SELECT {cols} FROM ledger_nodes "
                    f"WHERE level = {ph} AND idx < {ph} ORDER BY idx",
                    (level, count),
                )
                rows = cur.fetchall()
                return rows if with_idx else [bytes(r[0]) for r in rows]
            finally:
                cur.close()

        rows = entry_batches()
        if deep:
            rows = _deep_rows(rows, conn, ph, report)
        _verify(rows, verifier, db_notes, file_notes, report, nodes=node_rows, head=head)
        if limit is not None:
            extra = conn.execute(select(func.count()).where(e.seq >= limit)).scalar_one()
            size2 = int(conn.execute(select(h.size).where(h.id == 1)).scalar_one())
            if extra != size2 - limit:
                report.add(Problem("inserted", f"{extra} entries beyond the head size {limit} "
                                   f"(head now {size2})", limit))
                report.sort()
        for j in junk:
            report.add(Problem("checkpoint", "checkpoint file holds a record that is not a signed "
                               f"note: {j[:60]!r}"))
    report.elapsed_s = time.perf_counter() - t0
    return report


def _deep_rows(batches: Iterable[Batch], conn, ph: str, report: Report) -> Iterator[Batch]:  # type: ignore[no-untyped-def]
    """Pass batches through, checking each leaf parses as a canonical event and that the
    UID index holds exactly the references the leaf implies."""
    from audit.events import Outcome, event_from_leaf, event_refs, event_to_leaf

    dbapi = conn.connection.driver_connection
    for batch in batches:
        if batch:
            lo, hi = int(batch[0][0]), int(batch[-1][0])
            cur = dbapi.cursor()
            try:
                cur.execute(
                    f"SELECT seq, role, uid FROM ledger_refs WHERE seq >= {ph} AND seq <= {ph}",
                    (lo, hi),
                )
                stored: dict[int, set[tuple[str, str]]] = {}
                for seq, role, uid in cur.fetchall():
                    stored.setdefault(int(seq), set()).add((role, uid))
                cur.execute(
                    "SELECT seq, event_type, actor, outcome FROM ledger_entries "
                    f"WHERE seq >= {ph} AND seq <= {ph}", (lo, hi))
                columns = {int(r[0]): (r[1], r[2], r[3]) for r in cur.fetchall()}
            finally:
                cur.close()
            for r in batch:
                seq, data = int(r[0]), bytes(r[2])
                try:
                    ev = event_from_leaf(data)
                    if event_to_leaf(ev) != data:
                        raise ValueError("leaf is not in canonical form")
                except Exception as exc:
                    report.add(Problem("leaf", f"leaf data is not a canonical event: {exc}", seq))
                    continue
                copied = (ev.type.value, ev.actor[:128], Outcome(ev.outcome).value)
                if columns.get(seq) != copied:
                    report.add(Problem("index", "copied columns (event_type, actor, outcome) "
                                       "differ from the leaf (queries would be misled)", seq))
                if set(event_refs(ev)) != stored.get(seq, set()):
                    report.add(Problem("index", "UID index rows differ from the UIDs in the leaf "
                                       "(query / lineage results would be wrong)", seq))
        yield batch


#: The readable fields of a version 2 export line, each of which must equal the leaf's own.
READABLE_FIELDS = ("type", "time", "actor", "outcome", "subject", "payload")


def _readable_differs(obj: dict[str, Any], data: bytes) -> bool:
    """True when a line's readable fields are not what its leaf says (an edited export)."""
    if not any(k in obj for k in READABLE_FIELDS):
        return False
    try:
        leaf = json.loads(data.decode("utf-8"))
    except ValueError:
        return True
    return any(obj.get(k) != leaf.get(k) for k in READABLE_FIELDS)


def read_export(path: Path, mismatched: list[int] | None = None,
                ) -> tuple[dict, list[tuple[int, bytes, bytes]], list[str]]:
    """Parse a ledger export (JSON lines, see ``audit.export.export_ledger``); the entries
    whose readable fields differ from their leaf are appended to ``mismatched``."""
    header: dict = {}
    rows: list[tuple[int, bytes, bytes]] = []
    notes: list[str] = []
    with Path(path).open("r", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            obj = json.loads(line)
            if i == 0:
                if obj.get("format") != EXPORT_FORMAT:
                    raise ValueError(f"{path} is not a {EXPORT_FORMAT} file")
                header = obj
            elif "checkpoint" in obj:
                notes.append(obj["checkpoint"])
            else:  # version 2: the leaf as text; version 1 (and damaged leaves): base64
                data = (obj["leaf"].encode("utf-8") if "leaf" in obj
                        else base64.b64decode(obj["data"]))
                rows.append((int(obj["seq"]), bytes.fromhex(obj["leaf_hash"]), data))
                if mismatched is not None and _readable_differs(obj, data):
                    mismatched.append(int(obj["seq"]))
    return header, rows, notes


def verify_export(path: Path, verifier: Verifier, checkpoint_file: Path | None = None) -> Report:
    """Verify an export file: leaves, root, and the signed checkpoints it carries."""
    t0 = time.perf_counter()
    mismatched: list[int] = []
    header, rows, notes = read_export(path, mismatched)
    db_notes = []
    for note in notes:
        try:
            cp: Checkpoint = open_checkpoint(note, verifier)
            db_notes.append((cp.size, cp.root, note))
        except InvalidCheckpoint:
            db_notes.append((-1, b"", note))
    file_notes = None
    if checkpoint_file is not None:
        file_notes, _ = read_checkpoint_file(checkpoint_file)
    report = _verify([rows], verifier, db_notes, file_notes, Report())
    for seq in mismatched:
        report.add(Problem("export", "the readable fields differ from the leaf (the leaf is "
                                     "what the hashes cover)", seq))
    report.sort()
    if int(header.get("size", report.size)) != report.size:
        report.add(
            Problem(
                "truncated", f"export header says {header['size']} entries, found {report.size}"
            )
        )
    report.elapsed_s = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m audit.verify", description=__doc__.split("\n\n")[0]
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", help="database URL (sqlite:///..., postgresql+psycopg://...)")
    src.add_argument("--export", type=Path, help="ledger export file (JSON lines)")
    ap.add_argument("--pubkey", type=Path, required=True,
                    help="verifier key file (name+id+key, from `synthnode audit pubkey`) or PEM")
    ap.add_argument("--origin", help="key name / origin (needed with a PEM public key)")
    ap.add_argument("--checkpoints", type=Path, help="external checkpoint file to cross-check")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument(
        "--deep", action="store_true", help="also parse every leaf and check the UID index"
    )
    args = ap.parse_args(argv)
    try:
        verifier = load_verifier(args.pubkey, args.origin)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.db:
        from sqlalchemy import create_engine

        report = verify_database(create_engine(args.db), verifier, args.checkpoints, deep=args.deep)
    else:
        report = verify_export(args.export, verifier, args.checkpoints)
    print_report(report, as_json=args.json)
    return 0 if report.ok else 1


def print_report(report: Report, *, as_json: bool = False, out=None) -> None:  # type: ignore[no-untyped-def]
    out = out or sys.stdout
    if as_json:
        print(json.dumps(report.as_dict(), indent=2), file=out)
        return
    status = "OK" if report.ok else "FAILED"
    print(f"{status}: {report.size} entries, root {report.root.hex()}, "
          f"{report.checkpoints} stored checkpoint(s), {report.file_checkpoints} in file, "
          f"{report.elapsed_s:.2f} s", file=out)
    if not report.ok:
        if report.first_bad_entry is not None:
            print(f"first bad entry: {report.first_bad_entry}", file=out)
        for p in report.problems:
            print(f"  {p}", file=out)


if __name__ == "__main__":
    sys.exit(main())
