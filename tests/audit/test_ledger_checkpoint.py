"""Checkpoints: C2SP signed-note format, key handling, the never-two-checkpoints rule,
crash between file write and database commit, syslog copy."""
from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tests.support.ledger import LedgerEnv, make_event
from sqlalchemy import delete, update

from audit import merkle
from audit.checkpoint import (
    EM_DASH,
    InvalidCheckpoint,
    Verifier,
    load_or_create_key,
    open_checkpoint,
    read_checkpoint_file,
    sign_checkpoint,
)
from audit.ledger import LedgerError
from audit.tables import ledger_checkpoints, ledger_entries, ledger_head, ledger_nodes
from audit.verify import verify_database
from node.db import make_engine

REPO = Path(__file__).resolve().parents[2]

# golang.org/x/mod/sumdb/note documentation example (known answer for key id and signature)
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_SIG = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="


def test_go_note_known_answer() -> None:
    v = Verifier.parse(GO_VKEY)
    assert v.key_id.hex() == "c74f20a3"
    assert v.vkey() == GO_VKEY
    blob = base64.b64decode(GO_SIG)
    assert blob[:4] == v.key_id
    v.public.verify(blob[4:], GO_TEXT.encode())
    with pytest.raises(ValueError):
        Verifier.parse(GO_VKEY.replace("c74f20a3", "c74f20a4"))


def test_key_created_0600_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "k" / "ledger.key"
    k1 = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    k2 = load_or_create_key(path)
    assert k1.public_key().public_bytes_raw() == k2.public_key().public_bytes_raw()
    path.chmod(0o644)
    with pytest.raises(LedgerError, match="0600"):
        load_or_create_key(path)


def test_checkpoint_note_format_and_verification(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k")
    root = bytes(range(32))
    cp = sign_checkpoint("example.com/log", 42, root, key)
    body, sig = cp.note.split("\n\n")
    assert body == f"example.com/log\n42\n{base64.b64encode(root).decode()}"
    assert sig.startswith(f"{EM_DASH} example.com/log ") and sig.endswith("\n")
    v = Verifier("example.com/log", key.public_key())
    assert open_checkpoint(cp.note, v) == cp
    tampered = cp.note.replace("\n42\n", "\n43\n")
    with pytest.raises(InvalidCheckpoint):
        open_checkpoint(tampered, v)
    other = Verifier("example.com/log", load_or_create_key(tmp_path / "k2").public_key())
    with pytest.raises(InvalidCheckpoint):
        open_checkpoint(cp.note, other)
    with pytest.raises(InvalidCheckpoint):
        open_checkpoint(cp.note, v, origin="other.example/log")


def test_checkpoints_grow_and_are_written_outside(ledger_env: LedgerEnv) -> None:
    svc = ledger_env.service
    assert svc.checkpoint() is None  # empty tree: nothing to sign
    svc.ledger.append_many([make_event(i) for i in range(5)])
    cp1 = svc.checkpoint()
    assert cp1 is not None and cp1.size == 5 and cp1.root == svc.ledger.root(5)
    assert svc.ledger.size() == 6  # the checkpoint.signed event
    assert svc.checkpoint() is None  # only its own event since: nothing new
    svc.ledger.append(make_event(9))
    cp2 = svc.checkpoint()
    assert cp2 is not None and cp2.size == 7
    notes, junk = read_checkpoint_file(ledger_env.checkpoint_file)
    assert notes == [cp1.note, cp2.note] and not junk
    assert [c[0] for c in svc.ledger.checkpoints()] == [5, 7]
    proof = svc.ledger.consistency_proof(5, 7)
    merkle.verify_consistency(5, 7, cp1.root, cp2.root, proof)
    rep = verify_database(make_engine(ledger_env.url), svc.verifier, ledger_env.checkpoint_file)
    assert rep.ok, rep.problems


def test_refuses_to_sign_after_truncation_or_rewrite(ledger_env: LedgerEnv) -> None:
    svc = ledger_env.service
    svc.ledger.append_many([make_event(i) for i in range(8)])
    cp = svc.checkpoint()
    assert cp is not None and cp.size == 8
    engine = svc.ledger.engine
    # truncate the database back to 4 entries (and drop its checkpoints): the file remembers
    leaves = [e.leaf_hash for e in svc.ledger.entries(0, 4)]
    tree = merkle.MemoryTree(leaves)
    with engine.begin() as conn:
        conn.execute(delete(ledger_entries).where(ledger_entries.c.seq >= 4))
        for level in range(1, 4):  # every cached subtree that reaches past leaf 3
            conn.execute(delete(ledger_nodes).where(ledger_nodes.c.level == level,
                                                    ledger_nodes.c.idx >= 4 >> level))
        conn.execute(delete(ledger_checkpoints))
        conn.execute(update(ledger_head).values(size=4, frontier=merkle.pack_frontier(tree.frontier)))
    with pytest.raises(LedgerError, match="truncated or restored"):
        svc.checkpoint()
    # grow again past 8 with different entries: a fork of the signed history
    svc.ledger.append_many([make_event(100 + i) for i in range(6)])
    with pytest.raises(LedgerError, match="rewritten"):
        svc.checkpoint()
    notes, _ = read_checkpoint_file(ledger_env.checkpoint_file)
    assert len(notes) == 1  # nothing new was signed


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    import audit.checkpoint as cpmod
    from audit.events import Event, EventType
    from audit.service import open_ledger
    from node.db import make_engine
    mode = sys.argv[1]
    svc = open_ledger(make_engine({url!r}), key_file=__import__('pathlib').Path({key!r}),
                      checkpoint_file=__import__('pathlib').Path({cpf!r}), origin="test.example/ledger")
    if mode == "after-file":
        orig = cpmod.append_checkpoint_file
        def killing(path, note):
            orig(path, note)
            os.kill(os.getpid(), 9)   # crash after the file write, before the DB commit
        cpmod.append_checkpoint_file = killing
        svc.ledger.append_many([Event(EventType.QUERY, "ae:X", payload={{"i": i}}) for i in range(7)])
        svc.checkpoint()
    else:
        i = 0
        print("ready", flush=True)
        while True:
            svc.ledger.append(Event(EventType.QUERY, "ae:X", payload={{"i": i}}))
            if i % 5 == 0:
                svc.checkpoint()
            i += 1
""")


def _script(env: LedgerEnv) -> str:
    return CRASH_SCRIPT.format(repo=str(REPO), url=env.url, key=str(env.key_file),
                               cpf=str(env.checkpoint_file))


def test_crash_after_file_write_before_commit(ledger_env: LedgerEnv) -> None:
    proc = subprocess.run([sys.executable, "-c", _script(ledger_env), "after-file"], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    notes, _ = read_checkpoint_file(ledger_env.checkpoint_file)
    assert len(notes) == 1
    svc = ledger_env.reopen()
    assert svc.ledger.size() == 7 and svc.ledger.checkpoints() == []
    rep = verify_database(svc.ledger.engine, svc.verifier, ledger_env.checkpoint_file)
    assert rep.ok, rep.problems
    again = svc.checkpoint()  # recovers the file's checkpoint; signs nothing new
    assert again is not None and again.note == notes[0]
    assert read_checkpoint_file(ledger_env.checkpoint_file)[0] == notes
    assert [c[0] for c in svc.ledger.checkpoints()] == [7]
    svc.ledger.append(make_event(1))
    assert svc.checkpoint().size == 8
    assert verify_database(svc.ledger.engine, svc.verifier, ledger_env.checkpoint_file).ok


def test_kill_at_random_point_leaves_verifiable_ledger(ledger_env: LedgerEnv) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _script(ledger_env), "loop"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    time.sleep(1.5)
    proc.kill()
    proc.wait(timeout=30)
    svc = ledger_env.reopen()
    assert svc.ledger.size() > 0
    rep = verify_database(svc.ledger.engine, svc.verifier, ledger_env.checkpoint_file)
    assert rep.ok, rep.problems
    notes, _ = read_checkpoint_file(ledger_env.checkpoint_file)
    sizes = [open_checkpoint(n, svc.verifier).size for n in notes]
    assert sizes == sorted(set(sizes))  # never two checkpoints for one size, never smaller
    svc.ledger.append(make_event(1))
    assert svc.checkpoint() is not None
    assert verify_database(svc.ledger.engine, svc.verifier, ledger_env.checkpoint_file).ok


def test_syslog_copy_over_udp(ledger_env: LedgerEnv) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.settimeout(5)
        svc = ledger_env.service
        svc.checkpointer.syslog_target = f"udp://127.0.0.1:{srv.getsockname()[1]}"
        svc.ledger.append(make_event(0))
        cp = svc.checkpoint()
        msg, _ = srv.recvfrom(65535)
    assert msg.startswith(b"<110>1 ")  # facility 13 (log audit), severity 6; version 1
    header, _, body = msg.partition(b"\xef\xbb\xbf")
    assert b" synthnode " in header and b" CHECKPOINT - " in header
    assert body.decode() == cp.note


def test_periodic_checkpoints_and_final_one_on_stop(ledger_env: LedgerEnv) -> None:
    svc = ledger_env.service
    svc.interval_s = 0.05
    svc.ledger.append_many([make_event(i) for i in range(3)])
    svc.start()
    try:
        for _ in range(200):
            if svc.ledger.checkpoints():
                break
            time.sleep(0.05)
        assert [c[0] for c in svc.ledger.checkpoints()][:1] == [3]
        time.sleep(0.3)  # idle: only the checkpoint event is new, nothing more is signed
        assert len(svc.ledger.checkpoints()) == 1
        svc.ledger.append(make_event(10))
    finally:
        svc.stop()
    sizes = [c[0] for c in svc.ledger.checkpoints()]
    assert sizes[0] == 3 and sizes[-1] == 5  # the stop signs the tail
    assert verify_database(svc.ledger.engine, svc.verifier, ledger_env.checkpoint_file).ok
