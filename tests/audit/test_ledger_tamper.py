"""`audit verify` detects tampering and names where: hypothesis properties over byte flips
in stored leaves and nodes, deleted / reordered / inserted entries, truncation and a full
rewrite by someone who recomputes every hash (caught by the signed checkpoints)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
from tests.support.ledger import LedgerEnv, make_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, select, update

from audit import merkle
from audit.tables import ledger_checkpoints, ledger_entries, ledger_head, ledger_nodes
from audit.verify import Report, verify_database

N = 37  # entries; a checkpoint is signed at 30, so 30 is its event, 31..36 follow
CP = 30


@pytest.fixture
def filled(ledger_env: LedgerEnv) -> LedgerEnv:
    svc = ledger_env.service
    svc.ledger.append_many([make_event(i) for i in range(CP)])
    assert svc.checkpoint().size == CP
    svc.ledger.append_many([make_event(100 + i) for i in range(N - CP - 1)])
    assert svc.ledger.size() == N
    assert _verify(ledger_env).ok
    return ledger_env


def _verify(env: LedgerEnv) -> Report:
    return verify_database(env.service.ledger.engine, env.service.verifier, env.checkpoint_file)


def _names(report: Report, seq: int) -> bool:
    """The report's first problem with an entry range covers ``seq``."""
    ranged = [p for p in report.problems if p.seq is not None]
    assert ranged, report.problems
    p = ranged[0]
    return p.seq <= seq <= (p.last if p.last is not None else p.seq)


def _flip(b: bytes, pos: int, bit: int) -> bytes:
    a = bytearray(b)
    a[pos % len(a)] ^= 1 << bit
    return bytes(a)


def _tampered(env: LedgerEnv, change: Callable, restore: Callable) -> Report:
    engine = env.service.ledger.engine
    with engine.begin() as conn:
        change(conn)
    try:
        return _verify(env)
    finally:
        with engine.begin() as conn:
            restore(conn)
        assert _verify(env).ok


def _row(conn, seq: int):  # type: ignore[no-untyped-def]
    return conn.execute(select(ledger_entries).where(ledger_entries.c.seq == seq)).one()._asdict()


SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(seq=st.integers(0, N - 1), pos=st.integers(0, 10_000), bit=st.integers(0, 7),
       column=st.sampled_from(["data", "leaf_hash"]))
def test_flip_any_byte_of_any_leaf(filled: LedgerEnv, seq: int, pos: int, bit: int, column: str) -> None:
    saved: dict = {}

    def change(conn) -> None:  # type: ignore[no-untyped-def]
        saved.update(_row(conn, seq))
        conn.execute(update(ledger_entries).where(ledger_entries.c.seq == seq)
                     .values({column: _flip(bytes(saved[column]), pos, bit)}))

    def restore(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute(update(ledger_entries).where(ledger_entries.c.seq == seq)
                     .values({column: bytes(saved[column])}))

    report = _tampered(filled, change, restore)
    assert not report.ok
    assert report.first_bad_entry == seq
    assert _names(report, seq)


@SETTINGS
@given(pick=st.integers(0, 10_000), pos=st.integers(0, 31), bit=st.integers(0, 7))
def test_flip_any_byte_of_any_node(filled: LedgerEnv, pick: int, pos: int, bit: int) -> None:
    with filled.service.ledger.engine.connect() as conn:
        ids = conn.execute(select(ledger_nodes.c.level, ledger_nodes.c.idx)
                           .order_by(ledger_nodes.c.level, ledger_nodes.c.idx)).all()
    level, idx = ids[pick % len(ids)]
    where = (ledger_nodes.c.level == level) & (ledger_nodes.c.idx == idx)
    saved: list[bytes] = []

    def change(conn) -> None:  # type: ignore[no-untyped-def]
        saved.append(bytes(conn.execute(select(ledger_nodes.c.hash).where(where)).scalar_one()))
        conn.execute(update(ledger_nodes).where(where).values(hash=_flip(saved[0], pos, bit)))

    def restore(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute(update(ledger_nodes).where(where).values(hash=saved[0]))

    report = _tampered(filled, change, restore)
    assert not report.ok
    assert _names(report, idx << level)


@SETTINGS
@given(seq=st.integers(0, N - 1))
def test_delete_any_entry(filled: LedgerEnv, seq: int) -> None:
    saved: dict = {}

    def change(conn) -> None:  # type: ignore[no-untyped-def]
        saved.update(_row(conn, seq))
        conn.execute(delete(ledger_entries).where(ledger_entries.c.seq == seq))

    def restore(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute(insert(ledger_entries).values(**saved))

    report = _tampered(filled, change, restore)
    assert not report.ok and report.first_bad_entry == seq


@SETTINGS
@given(a=st.integers(0, N - 1), b=st.integers(0, N - 1))
def test_reorder_two_entries(filled: LedgerEnv, a: int, b: int) -> None:
    if a == b:
        return
    lo = min(a, b)
    saved: dict = {}

    def swap(conn, x: dict, y: dict) -> None:  # type: ignore[no-untyped-def]
        for src, dst in ((x, y["seq"]), (y, x["seq"])):
            conn.execute(update(ledger_entries).where(ledger_entries.c.seq == dst).values(
                data=bytes(src["data"]), leaf_hash=bytes(src["leaf_hash"])))

    def change(conn) -> None:  # type: ignore[no-untyped-def]
        saved["a"], saved["b"] = _row(conn, a), _row(conn, b)
        swap(conn, saved["a"], saved["b"])

    def restore(conn) -> None:  # type: ignore[no-untyped-def]
        for row in (saved["a"], saved["b"]):
            conn.execute(update(ledger_entries).where(ledger_entries.c.seq == row["seq"]).values(
                data=bytes(row["data"]), leaf_hash=bytes(row["leaf_hash"])))

    report = _tampered(filled, change, restore)
    assert not report.ok
    assert _names(report, lo)


def test_inserted_entry_beyond_head(filled: LedgerEnv) -> None:
    from audit.events import event_to_leaf

    data = event_to_leaf(make_event(999))
    row = {"seq": N, "leaf_hash": merkle.leaf_hash(data), "data": data, "event_type": "query",
           "time": make_event(0).time, "actor": "ae:EVIL", "outcome": "success"}
    report = _tampered(filled, lambda c: c.execute(insert(ledger_entries).values(**row)),
                       lambda c: c.execute(delete(ledger_entries).where(ledger_entries.c.seq == N)))
    assert not report.ok and report.first_bad_entry == N


def _rewrite_consistently(conn, keep: int, replace: dict[int, bytes]) -> None:  # type: ignore[no-untyped-def]
    """What an attacker with database access can do: rewrite entries and recompute every
    leaf hash, node and the head so the database is self-consistent."""
    rows = conn.execute(select(ledger_entries.c.seq, ledger_entries.c.data)
                        .where(ledger_entries.c.seq < keep).order_by(ledger_entries.c.seq)).all()
    conn.execute(delete(ledger_entries).where(ledger_entries.c.seq >= keep))
    tree = merkle.MemoryTree()
    for seq, data in rows:
        data = replace.get(seq, bytes(data))
        lh = merkle.leaf_hash(data)
        conn.execute(update(ledger_entries).where(ledger_entries.c.seq == seq).values(data=data, leaf_hash=lh))
        tree.append(lh)
    conn.execute(delete(ledger_nodes))
    conn.execute(insert(ledger_nodes), [{"level": lv, "idx": i, "hash": h}
                                        for (lv, i), h in tree.nodes.items() if lv > 0])
    conn.execute(update(ledger_head).values(size=keep, frontier=merkle.pack_frontier(tree.frontier)))


def test_truncation_detected_by_checkpoints(filled: LedgerEnv) -> None:
    engine = filled.service.ledger.engine
    with engine.begin() as conn:
        _rewrite_consistently(conn, 20, {})
    report = _verify(filled)
    assert not report.ok
    assert any(p.kind == "truncated" and p.seq == 20 for p in report.problems), report.problems
    # the attacker also deletes the stored checkpoints: the external file still tells
    with engine.begin() as conn:
        conn.execute(delete(ledger_checkpoints))
    report = _verify(filled)
    assert not report.ok and any(p.kind == "truncated" for p in report.problems)
    # and the node refuses to sign the shorter history
    from audit.ledger import LedgerError

    with pytest.raises(LedgerError):
        filled.service.checkpoint()


def test_consistent_rewrite_detected_by_checkpoint(filled: LedgerEnv) -> None:
    from audit.events import event_to_leaf

    engine = filled.service.ledger.engine
    with engine.begin() as conn:
        _rewrite_consistently(conn, N, {7: event_to_leaf(make_event(7, series_uid="1.2.3.forged"))})
    report = _verify(filled)
    assert not report.ok
    rewritten = [p for p in report.problems if p.kind == "rewritten"]
    assert rewritten and rewritten[0].seq <= 7 <= rewritten[0].last
    # everything else in the database is self-consistent: only the signed checkpoint tells
    assert {p.kind for p in report.problems} == {"rewritten"}


def test_deep_verify_checks_uid_index(filled: LedgerEnv) -> None:
    """Deleting UID-index rows would hide an entry from `audit query`: --deep tells."""
    from audit.tables import ledger_refs

    env = filled
    engine = env.service.ledger.engine
    rep = verify_database(engine, env.service.verifier, env.checkpoint_file, deep=True)
    assert rep.ok, rep.problems
    saved: list = []

    def change(conn) -> None:  # type: ignore[no-untyped-def]
        saved.extend(r._asdict() for r in conn.execute(select(ledger_refs).where(ledger_refs.c.seq == 5)))
        conn.execute(delete(ledger_refs).where(ledger_refs.c.seq == 5))

    with engine.begin() as conn:
        change(conn)
    assert _verify(env).ok  # the hashed data is intact ...
    rep = verify_database(engine, env.service.verifier, env.checkpoint_file, deep=True)
    assert not rep.ok and rep.first_bad_entry == 5  # ... but the index is not
    assert rep.problems[0].kind == "index"
    with engine.begin() as conn:
        conn.execute(insert(ledger_refs), saved)
    assert verify_database(engine, env.service.verifier, env.checkpoint_file, deep=True).ok
