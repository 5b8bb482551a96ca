"""Hostile input against a real ``synthnode serve`` subprocess: the malformed corpus
(tests/support/malformed.py) outcome per category, the node's peak RSS under a deflate
bomb, a 65535 x 65535 RLE file and a 256 MiB A-ASSOCIATE-RQ, and how long a legitimate
peer's C-ECHO association takes while 64 hostile connections are open.

    PYTHONPATH=$PWD python bench/bench_hostile.py [--old]

``--old`` leaves out the settings the code before the ingest policy does not know (to
measure the tree before the change with the same script).
"""
from __future__ import annotations

import argparse
import collections
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import tomli_w
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.dimse import NodeProcess, node_settings_dict, scu_store  # noqa: E402
from tests.support.malformed import build  # noqa: E402
from tests.support.net import get_port  # noqa: E402


def _rss(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size in MiB (VmRSS, VmHWM)."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0]) // 1024
    return vals["VmRSS"], vals["VmHWM"]


def _node(tmp: Path, name: str, **overrides: Any) -> NodeProcess:
    data = tmp / name
    data.mkdir()
    port = get_port()
    cfg = tmp / f"{name}.toml"
    cfg.write_bytes(tomli_w.dumps(node_settings_dict(data, port, **overrides)).encode())
    return NodeProcess(config=cfg, data_dir=data, port=port, log=tmp / f"{name}.log").start()


def _echo_seconds(port: int) -> float:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 120
    ae.add_requested_context(Verification)
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNTHNODE")
    ok = assoc.is_established and assoc.send_c_echo().Status == 0
    if assoc.is_established:
        assoc.release()
    dt = time.perf_counter() - t0
    return dt if ok else float("nan")


def corpus(tmp: Path, old: bool) -> None:
    over: dict[str, Any] = {} if old else {"ingest": {"max_inflated_bytes": 1024 * 1024}}
    node = _node(tmp, "corpus", **over)
    try:
        cases = build(tmp / "files", bomb_bytes=4 * 1024 * 1024)
        statuses = scu_store(("127.0.0.1", node.port), [c.path for c in cases])
    finally:
        node.kill()
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    wrong = 0
    for c, st in zip(cases, statuses, strict=True):
        acked = st is not None and (st == 0 or (st & 0xF000) == 0xB000)
        table[c.category]["acknowledged" if acked else "refused"] += 1
        if acked != c.must_store:
            wrong += 1
    print(f"corpus: {len(cases)} files, {wrong} with the wrong outcome "
          "(malformed acknowledged or control refused)")
    print("| category | files | must be stored | acknowledged | refused |")
    print("|---|---|---|---|---|")
    for cat in sorted(table):
        n = sum(table[cat].values())
        must = sum(1 for c in cases if c.category == cat and c.must_store)
        print(f"| {cat} | {n} | {must} | {table[cat]['acknowledged']} | "
              f"{table[cat]['refused']} |")


def _deflate_bomb(tmp: Path) -> Path:
    """CT_small with a 512 MiB private OB of zeros, deflated (about 0.5 MB)."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.support.dimse import write_part10

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1137.20.1.1"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    body = fp.getvalue()
    at = body.index(struct.pack("<HH", 0x7FE0, 0x0010))
    n = 512 * 1024 * 1024
    head = (struct.pack("<HH", 0x0077, 0x0010) + b"LO" + struct.pack("<H", 4) + b"I20 "
            + struct.pack("<HH", 0x0077, 0x1001) + b"OB\0\0" + struct.pack("<I", n))
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [c.compress(body[:at] + head)]
    chunk = b"\0" * (16 * 1024 * 1024)
    for _ in range(n // len(chunk)):
        out.append(c.compress(chunk))
    out.append(c.compress(body[at:]))
    out.append(c.flush())
    data = b"".join(out)
    return write_part10(tmp / "bomb.dcm", data, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                        DeflatedExplicitVRLittleEndian)


def memory(tmp: Path) -> None:
    node = _node(tmp, "memory")
    pid = node.proc.pid if node.proc else 0
    try:
        base = _rss(pid)
        print(f"node RSS at start: {base[0]} MiB (peak {base[1]} MiB)")
        bomb = _deflate_bomb(tmp)
        st = scu_store(("127.0.0.1", node.port), [bomb])
        print(f"deflate bomb ({bomb.stat().st_size // 1024} KiB file, 512 MiB inflated): "
              f"status 0x{st[0] or 0:04X}; RSS {_rss(pid)[0]} MiB, peak {_rss(pid)[1]} MiB")
        cases = {c.name: c for c in build(tmp / "mfiles")}
        st = scu_store(("127.0.0.1", node.port), [cases["px_rle_65535"].path])
        print(f"RLE 65535 x 65535: status 0x{st[0] or 0:04X}; RSS {_rss(pid)[0]} MiB, "
              f"peak {_rss(pid)[1]} MiB")
        s = socket.create_connection(("127.0.0.1", node.port))
        sent = 0
        try:
            s.sendall(struct.pack(">BBL", 1, 0, 256 * 1024 * 1024))
            chunk = b"\0" * (1 << 20)
            while sent < 256 * 1024 * 1024:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        s.close()
        time.sleep(0.5)
        print(f"A-ASSOCIATE-RQ declaring 256 MiB: node closed after {sent // (1 << 20)} MiB "
              f"sent; RSS {_rss(pid)[0]} MiB, peak {_rss(pid)[1]} MiB")
    finally:
        node.kill()


def slots(tmp: Path, old: bool) -> None:
    over: dict[str, Any] = {"dimse": {"max_associations": 16, "acse_timeout_s": 30}}
    node = _node(tmp, "slots", **over)
    hostile: list[socket.socket] = []
    stop = threading.Event()
    try:
        base = [_echo_seconds(node.port) for _ in range(5)]
        for i in range(64):
            s = socket.create_connection(("127.0.0.1", node.port))
            if i % 2:  # half trickle an A-ASSOCIATE-RQ a byte at a time
                s.send(b"\x01")
            hostile.append(s)

        def trickle() -> None:
            while not stop.is_set():
                for s in hostile[1::2]:
                    try:
                        s.send(b"\0")
                    except OSError:
                        pass
                stop.wait(1.0)

        th = threading.Thread(target=trickle, daemon=True)
        th.start()
        time.sleep(1.0)
        under = [_echo_seconds(node.port) for _ in range(5)]
        stop.set()
        print(f"legitimate C-ECHO association, median of 5: {sorted(base)[2]:.3f} s alone, "
              f"{sorted(under)[2]:.3f} s with 64 hostile connections open "
              f"(max {max(under):.3f} s; nan = refused)")
    finally:
        stop.set()
        for s in hostile:
            s.close()
        node.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", action="store_true")
    ap.add_argument("--only", choices=["corpus", "memory", "slots"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "corpus"):
            corpus(tmp, args.old)
        if args.only in (None, "slots"):
            slots(tmp, args.old)
        if args.only in (None, "memory"):
            memory(tmp)


if __name__ == "__main__":
    main()
