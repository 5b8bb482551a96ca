"""Ledger append API: sequence numbers, same-transaction commit/rollback, concurrency."""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
from sqlalchemy import select, text

from audit import merkle
from audit.events import Event, EventType, event_to_leaf
from audit.ledger import Ledger
from audit.tables import ledger_entries
from node.db import make_engine


def ev(i: int, **subject: str) -> Event:
    return Event(EventType.INSTANCE_RECEIVED, f"ae:MOD{i % 7}",
                 subject={"sop_uid": f"1.2.3.{i}", **subject}, payload={"n": i})


def test_append_returns_gapless_seq_and_leaf_hash(migrated_db: str) -> None:
    ledger = Ledger(make_engine(migrated_db))
    got = [ledger.append(ev(i)) for i in range(5)]
    got += ledger.append_many([ev(i) for i in range(5, 12)])
    assert [e.seq for e in got] == list(range(12))
    for i, e in enumerate(got):
        assert e.leaf_hash == merkle.leaf_hash(event_to_leaf(ledger.entry(i).event))
    leaves = [e.leaf_hash for e in got]
    assert ledger.size() == 12
    assert ledger.root() == merkle.root_from_leaves(leaves)
    assert ledger.head() == (12, merkle.root_from_leaves(leaves))


def test_append_in_caller_transaction_commits_and_rolls_back(migrated_db: str) -> None:
    engine = make_engine(migrated_db)
    ledger = Ledger(engine)
    ledger.append(ev(0))
    with pytest.raises(RuntimeError):
        with engine.begin() as conn:
            e = ledger.append(ev(1), conn=conn)
            assert e.seq == 1
            raise RuntimeError("caller fails after the append")
    assert ledger.size() == 1
    with engine.connect() as conn:
        assert conn.execute(select(ledger_entries.c.seq)).scalars().all() == [0]
    with engine.begin() as conn:
        e = ledger.append(ev(2), conn=conn)
    assert e.seq == 1  # the rolled-back number is reused: no gap
    assert ledger.size() == 2


def _worker(url: str, n: int, tag: int, out: "mp.Queue[list[int]]") -> None:
    ledger = Ledger(make_engine(url))
    seqs = []
    for i in range(n):
        if i % 3 == 0:
            seqs += [e.seq for e in ledger.append_many([ev(i, job_id=f"w{tag}"), ev(i)])]
        else:
            seqs.append(ledger.append(ev(i, job_id=f"w{tag}")).seq)
    out.put(seqs)


def _check_no_fork(url: str, expected: int) -> None:
    ledger = Ledger(make_engine(url))
    assert ledger.size() == expected
    stored = list(ledger.entries())
    assert [s.seq for s in stored] == list(range(expected))
    leaves = [merkle.leaf_hash(s.data) for s in stored]
    assert [s.leaf_hash for s in stored] == leaves
    root = merkle.root_from_leaves(leaves)
    assert ledger.root() == root
    tree = merkle.MemoryTree(leaves)
    for size in (1, expected // 2, expected):
        assert ledger.root(size) == tree.root(size)


def test_concurrent_threads_never_fork(migrated_db: str) -> None:
    ledger = Ledger(make_engine(migrated_db))
    results: list[list[int]] = []
    lock = threading.Lock()

    def work(tag: int) -> None:
        seqs = []
        for i in range(15):
            seqs.append(ledger.append(ev(i, job_id=f"t{tag}")).seq)
        with lock:
            results.append(seqs)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allseq = sorted(s for r in results for s in r)
    assert allseq == list(range(60))
    for r in results:
        assert r == sorted(r)
    _check_no_fork(migrated_db, 60)


def test_concurrent_processes_never_fork(migrated_db: str) -> None:
    ctx = mp.get_context("spawn")
    q: mp.Queue[list[int]] = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(migrated_db, 12, t, q)) for t in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    allseq = sorted(s for r in results for s in r)
    n = 3 * (12 + 4)
    assert allseq == list(range(n))
    _check_no_fork(migrated_db, n)


def test_sqlite_write_lock_is_taken_by_first_statement(sqlite_url: str) -> None:
    """Two connections: the second appender waits for the first (no shared head read)."""
    from node.db import upgrade

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    ledger = Ledger(engine)
    with engine.begin() as c1:
        ledger.append(ev(0), conn=c1)
        with make_engine(sqlite_url).connect() as c2:
            c2.execute(text("PRAGMA busy_timeout=100"))
            c2.commit()
            with pytest.raises(Exception, match="locked"):
                with c2.begin():
                    Ledger.lock_head(c2)
    assert ledger.size() == 1


def test_writer_thread_exits_when_idle(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from audit import ledger as ledger_mod
    from node.db import upgrade

    monkeypatch.setattr(ledger_mod._GroupCommitter, "IDLE_S", 0.05)
    upgrade(sqlite_url)
    ledger = Ledger(make_engine(sqlite_url))
    assert ledger.append(ev(0)).seq == 0
    gc = ledger._gc
    assert gc is not None
    for _ in range(100):
        if gc.thread is None:
            break
        threading.Event().wait(0.02)
    assert gc.thread is None  # no thread left behind
    assert ledger.append(ev(1)).seq == 1  # restarted on demand
    ledger.close()
    assert gc.thread is None
