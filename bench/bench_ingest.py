"""C-STORE ingest benchmark: synthnode vs Orthanc vs pynetdicom storescp vs DCMTK storescp.

Sends, with DCMTK ``storescu`` on 1 and on N parallel associations (N processes, each
sending a contiguous share of the files), to each server started fresh on loopback:

* a generated 500-slice 512x512 16-bit CT series (CT Image Storage, explicit VR little
  endian; synthetic pixel data, valid headers: checked with dciodvfy), and
* the real corpus: every uncompressed image file shipped in pydicom / pydicom-data with a
  unique SOP Instance UID that storescu can send unchanged.

Servers (all in this run, same files, same client command):

* ``synthnode``  ``synthnode serve`` in a subprocess with a temp config (SQLite index,
  file store with fsync, ledger: the production durability path);
* ``orthanc``    the Debian ``Orthanc`` binary, temp JSON config (loopback, free ports,
  temp storage, DicomAlwaysAllowStore, TcpNoDelay), started with ``TCP_NODELAY=1``;
* ``pynetdicom`` ``python -m pynetdicom storescp -od DIR``;
* ``dcmtk``      DCMTK ``storescp --fork -od DIR`` (files only, no index).
* ``synthnode-mp`` synthnode with ``dimse.acceptor_processes = --mp`` (SO_REUSEPORT).

Every process (clients and servers) runs with ``TCP_NODELAY=1`` in its environment (DCMTK
otherwise keeps Nagle's algorithm on and each C-STORE waits for a delayed ACK).

Each (data set, server, associations) cell is repeated; the median wall time from the
first storescu start to the last storescu exit is reported as instances/s and MB/s (bytes of
the files sent), with the ratio to Orthanc. Every run checks that the server holds all
instances afterwards (a run that lost instances is reported as failed, not timed).

``--profile`` additionally runs synthnode under a per-thread cProfile (every association
thread profiled, merged) while receiving the series on one association, and prints where
the time goes.

Usage (exact commands behind bench/results/ingest.md)::

    nice -n 10 python bench/bench_ingest.py run --slices 500 --repeats 3 --assocs 1 4 \\
        --out bench/results/ingest.md
    nice -n 10 python bench/bench_ingest.py run --profile --slices 300 --repeats 0 ...
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom import dcmread, dcmwrite  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")
# DCMTK (storescu, storescp, and Orthanc's DICOM layer) leaves Nagle's algorithm on unless
# TCP_NODELAY is set in the environment; with it on, every C-STORE waits for a delayed ACK
# (~40 ms: 100 slices took 4.6 s instead of 0.6 s here). Set for every process we start;
# synthnode sets TCP_NODELAY on its accepted sockets itself, pynetdicom ignores the variable.
os.environ["TCP_NODELAY"] = "1"


# ------------------------------------------------------------------------------- tools
def dcmtk(name: str) -> str:
    """DCMTK's binary (pynetdicom installs same-named Python apps that shadow it on PATH)."""
    for d in DCMTK_DIRS:
        p = Path(d) / name
        if p.is_file():
            out = subprocess.run([str(p), "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return str(p)
    raise SystemExit(f"DCMTK {name} not found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


# ------------------------------------------------------------------------------- data
def make_series(out: Path, n: int, size: int = 512, seed: int = 7) -> list[Path]:
    """``n`` CT slices (CT Image Storage, 16-bit, explicit VR LE) of a simple body phantom."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = (size - 1) / 2
    body = ((xx - c) / (0.42 * size)) ** 2 + ((yy - c) / (0.32 * size)) ** 2 <= 1
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        z = i / max(n - 1, 1)
        r = 0.08 + 0.06 * np.sin(np.pi * z)
        lungs = (((xx - c + 0.18 * size) / (r * size)) ** 2 + ((yy - c) / (1.6 * r * size)) ** 2 <= 1) | \
                (((xx - c - 0.18 * size) / (r * size)) ** 2 + ((yy - c) / (1.6 * r * size)) ** 2 <= 1)
        hu = np.full((size, size), -1000.0, np.float32)
        hu[body] = 40.0
        hu[lungs & body] = -820.0
        hu += rng.normal(0, 12, hu.shape).astype(np.float32)
        stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)

        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.PatientName = "Bench^Phantom"
        ds.PatientID = "BENCH1"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = "BENCH"
        ds.Modality = "CT"
        ds.Laterality = ""
        ds.PatientPosition = "HFS"
        ds.Manufacturer = "synthnode-bench"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-(size / 2) * 0.7, -(size / 2) * 0.7, -250.0 + i * 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        p = out / f"ct{i:04d}.dcm"
        dcmwrite(p, ds, enforce_file_format=True)
        paths.append(p)
    return paths


def dciodvfy_errors(path: Path) -> tuple[int, str]:
    """Number of 'Error' lines dciodvfy reports for ``path`` (and its output)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        return -1, "dciodvfy not installed"
    out = subprocess.run([exe, str(path)], capture_output=True, text=True)
    text = out.stdout + out.stderr
    return sum(1 for line in text.splitlines() if line.startswith("Error")), text


def real_corpus(compressed: bool = False) -> list[Path]:
    """Image files of pydicom + pydicom-data with unique SOP Instance UIDs: uncompressed
    (explicit / implicit VR little endian), or with ``compressed`` the ones in a
    compressed transfer syntax (JPEG family, JPEG-LS, JPEG 2000, RLE), sent as stored."""
    import pydicom

    roots = [Path(pydicom.data.__file__).parent]
    try:
        import data_store

        roots.append(Path(data_store.__file__).parent)
    except ImportError:
        pass
    seen: set[str] = set()
    files = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.stat().st_size < 1024:
                continue
            with p.open("rb") as fh:
                if fh.read(132)[128:132] != b"DICM":
                    continue
            try:
                ds = dcmread(p, stop_before_pixels=False)
                ts = ds.file_meta.TransferSyntaxUID
                uid = str(ds.SOPInstanceUID)
                ok = ("PixelData" in ds and ts.is_compressed == compressed and ts.is_little_endian
                      and str(ds.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.")
                      and ds.file_meta.MediaStorageSOPInstanceUID == uid
                      and "StudyInstanceUID" in ds and "SeriesInstanceUID" in ds)
            except Exception:
                continue
            if ok and uid not in seen:
                seen.add(uid)
                files.append(p)
    return files


# ------------------------------------------------------------------------------- servers
@dataclass
class Server:
    name: str
    workdir: Path
    aet: str = "BENCHSCP"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        """SIGTERM the server's process group (started in its own session), then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # children (storescp --fork, acceptor processes) of this session only
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _popen(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.log = self.workdir / f"{self.name}.log"
        fh = self.log.open("wb")
        self.proc = subprocess.Popen(list(args), stdout=fh, stderr=subprocess.STDOUT,
                                     env=env, cwd=self.workdir, start_new_session=True)
        fh.close()


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _pg(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(sql)


class SynthNode(Server):
    profile_out: Path | None = None
    acceptors: int = 1
    #: index on PostgreSQL (a fresh database per start) instead of the embedded SQLite
    postgres: bool = False
    #: ``taskset -c`` CPU list for the server (None: every CPU)
    cpus: str | None = None
    #: the source tree whose node runs (another commit's checkout: before/after runs)
    repo: Path = REPO
    _pg_db: str | None = None

    def start(self) -> None:
        self.aet = "SYNTHNODE"
        self.port = free_port()
        data = self.workdir / "data"
        cfg = self.workdir / "synthnode.toml"
        cfg.write_text(
            'environment = "development"\n'
            f'data_dir = "{data}"\n'
            'log_level = "WARNING"\n'
            "[dimse]\n"
            f'ae_title = "{self.aet}"\nbind_address = "127.0.0.1"\nport = {self.port}\n'
            f"max_associations = 16\nacceptor_processes = {self.acceptors}\n"
            + "".join(f'[[dimse.allowed_peers]]\nae_title = "{a}"\n' for a in ("STORESCU",))
            + "[storage]\nmin_free_bytes = 0\n"
            + "[pipeline]\nenabled = false\n"
            + self._database_section()
        )
        env = {**os.environ, "PYTHONPATH": str(self.repo)}
        if self.profile_out is not None:
            args = [sys.executable, str(Path(__file__).resolve()), "profile-serve",
                    str(cfg), str(self.profile_out)]
        else:
            args = [sys.executable, "-c", "import sys; from node.cli import main; "
                    "sys.argv[0] = 'synthnode'; main()", "serve", "--config", str(cfg)]
        if self.cpus:
            args = ["taskset", "-c", self.cpus, *args]
        if self.postgres:  # the schema first, as `synthnode db upgrade` would
            subprocess.run([sys.executable, "-c", "import sys; from node.cli import main; "
                            "sys.argv[0] = 'synthnode'; main()", "db", "upgrade", "--config",
                            str(cfg)], env=env, check=True, capture_output=True,
                           cwd=self.workdir)
        self._popen(args, env)
        assert self.log is not None
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if b"synthnode: listening" in self.log.read_bytes():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        raise TimeoutError("synthnode did not start")

    def _database_section(self) -> str:
        if not self.postgres:
            return ""
        self._pg_db = f"bench_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        _pg(f"CREATE DATABASE {self._pg_db}")
        return ("[database]\n"
                f'url = "postgresql+psycopg://postgres@127.0.0.1:5432/{self._pg_db}"\n')

    def count(self) -> int:
        if self._pg_db is not None:
            import psycopg

            with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{self._pg_db}") as c:
                row = c.execute("select count(*) from instances").fetchone()
                return int(row[0]) if row else 0
        with sqlite3.connect(self.workdir / "data" / "index.db") as c:
            return int(c.execute("select count(*) from instances").fetchone()[0])

    def sop_uids(self) -> set[str]:
        if self._pg_db is not None:
            import psycopg

            with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{self._pg_db}") as c:
                return {r[0] for r in c.execute("select sop_instance_uid from instances")}
        with sqlite3.connect(self.workdir / "data" / "index.db") as c:
            return {r[0] for r in c.execute("select sop_instance_uid from instances")}

    def stop(self) -> None:
        super().stop()
        if self._pg_db is not None:
            _pg(f"DROP DATABASE IF EXISTS {self._pg_db} WITH (FORCE)")
            self._pg_db = None


class SynthNodeMP(SynthNode):
    """synthnode with ``dimse.acceptor_processes`` acceptor processes sharing the port."""

    acceptors = 2


class Orthanc(Server):
    def start(self) -> None:
        import httpx

        self.aet = "ORTHANC"
        self.port = free_port()
        self.http = free_port()
        cfg = {
            "Name": "bench", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "DicomAet": self.aet,
            "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False, "TcpNoDelay": True, "Plugins": [],
            "SaveJobs": False, "StorageCompression": False,
        }
        (self.workdir / "orthanc.json").write_text(json.dumps(cfg))
        self._popen(["Orthanc", "--logfile=" + str(self.workdir / "orthanc-internal.log"),
                     str(self.workdir / "orthanc.json")])
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(f"http://127.0.0.1:{self.http}/system", timeout=1).status_code == 200:
                    wait_port(self.port, self.proc)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("Orthanc did not start")

    def count(self) -> int:
        import httpx

        return int(httpx.get(f"http://127.0.0.1:{self.http}/statistics", timeout=30).json()["CountInstances"])


class PynetdicomSCP(Server):
    def start(self) -> None:
        self.aet = "STORESCP"
        self.port = free_port()
        (self.workdir / "out").mkdir()
        self._popen([sys.executable, "-m", "pynetdicom", "storescp", str(self.port),
                     "-aet", self.aet, "-ba", "127.0.0.1", "-od", str(self.workdir / "out")])
        wait_port(self.port, self.proc)

    def count(self) -> int:
        return sum(1 for _ in (self.workdir / "out").iterdir())


class DcmtkSCP(Server):
    def start(self) -> None:
        self.aet = "STORESCP"
        self.port = free_port()
        (self.workdir / "out").mkdir()
        self._popen([dcmtk("storescp"), "--fork", "+xa", "-aet", self.aet, "-od",
                     str(self.workdir / "out"), str(self.port)])
        wait_port(self.port, self.proc)

    def count(self) -> int:
        return sum(1 for _ in (self.workdir / "out").iterdir())


SERVERS: dict[str, type[Server]] = {
    "synthnode": SynthNode, "synthnode-mp": SynthNodeMP, "orthanc": Orthanc, "pynetdicom": PynetdicomSCP, "dcmtk": DcmtkSCP,
}


# ------------------------------------------------------------------------------- sending
def send(files: list[Path], port: int, aet: str, n_assoc: int, client: str = "storescu"
         ) -> tuple[float, list[int]]:
    """``client`` (DCMTK storescu, or dcmsend: proposes each file's own transfer syntax,
    compressed ones included) on ``n_assoc`` parallel associations; (wall s, exit codes)."""
    k, r = divmod(len(files), n_assoc)
    chunks, start = [], 0
    for i in range(n_assoc):
        end = start + k + (1 if i < r else 0)
        chunks.append(files[start:end])
        start = end
    exe = dcmtk(client)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([exe, "-aet", "STORESCU", "-aec", aet, "127.0.0.1", str(port),
                               *map(str, chunk)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for chunk in chunks if chunk]
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - t0
    for p, c in zip(procs, codes):
        if c and p.stderr is not None:
            print("    storescu:", p.stderr.read().decode(errors="replace")[-800:], flush=True)
    return elapsed, codes


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system, reaped children included) of every process in the
    process group ``pgid`` (a server and its acceptor / forked children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: pgrp
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def echo(port: int, aet: str) -> None:
    """C-ECHO before timing: the server is up and accepts STORESCU (same for all servers)."""
    out = subprocess.run([dcmtk("echoscu"), "-aet", "STORESCU", "-aec", aet, "127.0.0.1",
                          str(port)], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"echoscu failed: {out.stdout}{out.stderr}")


def echo_latency(port: int, aet: str, n: int = 5) -> float:
    """Median wall time of a whole echoscu run (associate, C-ECHO, release), seconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        echo(port, aet)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def preflight(files: list[Path], root: Path, client: str = "storescu") -> list[Path]:
    """Corpus files both DCMTK storescp and synthnode store (one pass each, ``client``)."""
    keep: set[str] | None = None
    for kind in ("dcmtk", "synthnode"):
        wd = Path(tempfile.mkdtemp(prefix=f"preflight-{kind}-", dir=root))
        server = SERVERS[kind](kind, wd)
        try:
            server.start()
            subprocess.run([dcmtk(client), *(["-nh"] if client == "storescu" else []),
                            "-aet", "STORESCU", "-aec", server.aet,
                            "127.0.0.1", str(server.port), *map(str, files)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            if kind == "dcmtk":
                got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                       for p in (wd / "out").iterdir()}
            else:
                got = cast(SynthNode, server).sop_uids()
        finally:
            server.stop()
            shutil.rmtree(wd, ignore_errors=True)
        keep = got if keep is None else keep & got
    assert keep is not None
    return [p for p in files if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) in keep]


@dataclass
class Cell:
    dataset: str
    server: str
    assocs: int
    n: int
    nbytes: int
    times: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    echo_s: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # server CPU per instance

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def ips(self) -> float | None:
        m = self.median
        return self.n / m if m else None

    @property
    def mbps(self) -> float | None:
        m = self.median
        return self.nbytes / m / 1e6 if m else None


CLIENT = {"ct-series": "storescu", "corpus": "storescu", "corpus-compressed": "dcmsend"}


def run_cell(cell: Cell, files: list[Path], root: Path, repeats: int) -> None:
    for rep in range(repeats):
        wd = Path(tempfile.mkdtemp(prefix=f"{cell.server}-{cell.assocs}-", dir=root))
        server = SERVERS[cell.server](cell.server, wd)
        os.sync()  # no dirty pages of an earlier run left for this server's flushes to wait on
        try:
            server.start()
            cell.echo_s.append(echo_latency(server.port, server.aet))
            cell.load.append(os.getloadavg()[0])
            assert server.proc is not None
            cpu0 = group_cpu_s(server.proc.pid)  # started with start_new_session
            elapsed, codes = send(files, server.port, server.aet, cell.assocs,
                                  CLIENT.get(cell.dataset, "storescu"))
            cell.cpu_ms.append((group_cpu_s(server.proc.pid) - cpu0) * 1000 / cell.n)
            deadline = time.monotonic() + 60
            got = server.count()
            while got < cell.n and time.monotonic() < deadline:
                time.sleep(0.2)
                got = server.count()
            if got != cell.n or any(codes):
                cell.failures.append(f"rep {rep}: stored {got}/{cell.n}, storescu exit {codes}")
            else:
                cell.times.append(elapsed)
            print(f"  {cell.dataset:8s} {cell.server:10s} x{cell.assocs}: {elapsed:7.2f} s "
                  f"({cell.n / elapsed:7.1f} inst/s) stored {got}/{cell.n}", flush=True)
        finally:
            server.stop()
            shutil.rmtree(wd, ignore_errors=True)


# ------------------------------------------------------------------------------- profiling
def profile_serve(config: str, out: str) -> None:
    """Run ``synthnode serve`` with every thread under cProfile; merged stats to ``out``."""
    import cProfile
    import threading

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    orig_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        prof = cProfile.Profile()
        prof.enable()
        try:
            orig_run(self)
        finally:
            prof.disable()
            with lock:
                profiles.append(prof)

    threading.Thread.run = run  # type: ignore[method-assign]
    main_prof = cProfile.Profile()
    from node.cli import main

    sys.argv = ["synthnode", "serve", "--config", config]
    main_prof.enable()
    try:
        main()
    except SystemExit:
        pass
    finally:
        main_prof.disable()
        import pstats

        # the main thread only starts the node and waits: its profile (start-up: building
        # ~200 presentation contexts, migrations) is kept apart from the receive path
        main_prof.dump_stats(out + ".main")
        st: pstats.Stats | None = None
        with lock:
            for p in profiles:
                try:
                    if st is None:
                        st = pstats.Stats(p)
                    else:
                        st.add(p)
                except TypeError:  # a profile with no data
                    pass
        if st is not None:
            st.dump_stats(out)


def summarise_profile(path: Path, n: int, wall: float) -> str:
    import pstats

    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    # waiting (locks, poll, sleep) dominates own time in idle threads; show work only
    st.sort_stats("tottime").print_stats(r"^(?!.*(acquire|poll|sleep|select|wait)).*$", 25)
    tot = buf.getvalue()
    buf2 = io.StringIO()
    st2 = pstats.Stats(str(path), stream=buf2)
    st2.sort_stats("cumulative").print_stats(
        r"ingest|filestore|index|ledger|store\.py|dimse|dul|association|fsync|pydicom")
    stages: dict[str, float] = {}
    wanted = {
        "C-STORE handler total (node.dimse.store.handle_store)": ("store.py", "handle_store"),
        "ingest (node.ingest.ingestor.Ingestor._ingest)": ("ingestor.py", "_ingest"),
        "  parse / checks (Ingestor._parse)": ("ingestor.py", "_parse"),
        "  file write + fsync + rename (FileStore.write)": ("filestore.py", "write"),
        "  os.fsync": ("~", "<built-in method posix.fsync>"),
        "  index row (attributes.index_record)": ("attributes.py", "index_record"),
        "  ledger append (Ledger._append_locked)": ("ledger.py", "_append_locked"),
        "pynetdicom DUL receive (dul.DULServiceProvider.run)": ("dul.py", "run"),
        "pynetdicom PDU decode (pdu.P_DATA_RF.decode)": ("pdu.py", "decode"),
        "pynetdicom DIMSE message decode (dimse.DIMSEServiceProvider.receive_primitive)":
            ("dimse.py", "receive_primitive"),
        "encoded_dataset (Event.encoded_dataset)": ("events.py", "encoded_dataset"),
    }
    raw = st2.stats  # type: ignore[attr-defined]
    for label, (fname, func) in wanted.items():
        total = 0.0
        for (f, _line, fn), (_cc, _nc, _tt, ct, _callers) in raw.items():
            if fn == func and (fname == "~" or f.endswith(fname)):
                total += ct
        stages[label] = total
    lines = [f"Profiled: {n} instances on 1 association, wall {wall:.2f} s "
             f"(cProfile slows Python code; compare shares, not absolute times). Association "
             "threads only (node start-up excluded).", "",
             "| stage (cumulative, summed over threads) | seconds | per instance (ms) |",
             "|---|---:|---:|"]
    for label, secs in stages.items():
        lines.append(f"| {label} | {secs:.2f} | {secs / n * 1000:.2f} |")
    lines += ["", "Top functions by own time (all threads merged):", "", "```",
              tot.strip()[:6000], "```"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- report
def table(cells: list[Cell]) -> str:
    ref = {(c.dataset, c.assocs): c.ips for c in cells if c.server == "orthanc"}
    lines = ["| data set | server | assocs | instances | MB | median s | inst/s | MB/s | vs Orthanc "
             "| server CPU ms/inst | echoscu run (ms) | load avg | runs (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cells:
        r = ref.get((c.dataset, c.assocs))
        ratio = f"{c.ips / r:.2f}x" if (c.ips and r) else "-"
        runs = ", ".join(f"{t:.2f}" for t in c.times) + (f"; FAILED {c.failures}" if c.failures else "")
        lines.append(
            f"| {c.dataset} | {c.server} | {c.assocs} | {c.n} | {c.nbytes / 1e6:.1f} | "
            f"{(c.median or 0):.2f} | {(c.ips or 0):.1f} | {(c.mbps or 0):.1f} | {ratio} | "
            f"{statistics.median(c.cpu_ms) if c.cpu_ms else 0:.2f} | "
            f"{statistics.median(c.echo_s) * 1000 if c.echo_s else 0:.0f} | "
            f"{statistics.median(c.load) if c.load else 0:.1f} | {runs} |")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> None:
    for spec in args.tree or []:  # NAME=PATH: synthnode from another checkout
        name, _, path = spec.partition("=")
        SERVERS[name] = type(f"SynthNode_{name}", (SynthNode,), {"repo": Path(path).resolve()})
        args.servers = [*args.servers, name]
    SynthNodeMP.acceptors = args.mp
    SynthNode.postgres = args.postgres
    SynthNode.cpus = args.cpus
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        print(f"generating {args.slices} CT slices ...", flush=True)
        series = make_series(root / "series", args.slices)
        errors, dvf = dciodvfy_errors(series[0])
        print(f"dciodvfy on slice 1: {errors} error(s)", flush=True)
        datasets: dict[str, list[Path]] = {"ct-series": series}
        if args.corpus:
            corpus = real_corpus()
            datasets["corpus"] = preflight(corpus, root)
            print(f"corpus: {len(datasets['corpus'])} of {len(corpus)} candidate files stored "
                  "by both DCMTK storescp and synthnode", flush=True)
        if args.compressed:
            comp = real_corpus(compressed=True)
            datasets["corpus-compressed"] = preflight(comp, root, "dcmsend")
            print(f"compressed corpus: {len(datasets['corpus-compressed'])} of {len(comp)} "
                  "candidate files stored by both", flush=True)
        if args.no_series:
            del datasets["ct-series"]
        cells: list[Cell] = []
        if args.repeats > 0:
            for name, files in datasets.items():
                nbytes = sum(p.stat().st_size for p in files)
                for n_assoc in args.assocs:
                    row = [Cell(name, server, n_assoc, len(files), nbytes)
                           for server in args.servers]
                    if args.interleave:  # rounds of one run per server, order alternating
                        for rep in range(args.repeats):
                            for cell in (row if rep % 2 == 0 else row[::-1]):
                                run_cell(cell, files, root, 1)
                    else:
                        for cell in row:
                            run_cell(cell, files, root, args.repeats)
                    cells.extend(row)
        if args.flame:  # py-spy (sampling, no slow-down of Python code)
            wd = root / "flame"
            wd.mkdir()
            node = SynthNode("synthnode", wd)
            node.start()
            echo(node.port, node.aet)
            assert node.proc is not None
            raw = ["--idle", "--format", "raw"] if args.flame.endswith(".txt") else []
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(node.proc.pid), "--rate",
                                    "250", "--threads", *raw, "--output", args.flame],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)  # py-spy attached
            try:
                send(series, node.port, node.aet, args.flame_assocs)
            finally:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
                node.stop()
            print(f"flame graph: {args.flame}", flush=True)
        prof_md = ""
        if args.profile:
            wd = root / "profile"
            wd.mkdir()
            node = SynthNode("synthnode", wd)
            node.profile_out = wd / "synthnode.prof"
            node.start()
            echo(node.port, node.aet)
            try:
                wall, codes = send(series, node.port, node.aet, 1)
                assert not any(codes) and node.count() == len(series), (codes, node.count())
            finally:
                node.stop()
            prof_md = summarise_profile(node.profile_out, len(series), wall)
            if args.keep_profile:
                shutil.copy(node.profile_out, args.keep_profile)
            print(prof_md)
        md = [f"# C-STORE ingest benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
              "", f"Command: `nice -n 10 python bench/bench_ingest.py {' '.join(sys.argv[1:])}`", "",
              f"Machine: {os.cpu_count()} CPUs (shared with other work while measuring), "
              f"Python {sys.version.split()[0]}.",
              f"Generated series: {args.slices} x 512x512 16-bit CT, dciodvfy errors on a slice: {errors}.",
              ""]
        if cells:
            md += [table(cells), ""]
        if prof_md:
            md += ["## Where synthnode's time goes", "", prof_md, ""]
        text = "\n".join(md)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps([c.__dict__ for c in cells], default=str, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--slices", type=int, default=500)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--interleave", action="store_true",
                   help="run the servers in rounds (one run each per round, the order "
                        "reversed every other round) instead of all repeats of one server "
                        "back to back: drift of the machine during the run is spread over "
                        "every server (A/B comparisons of trees)")
    r.add_argument("--assocs", type=int, nargs="+", default=[1, 4])
    r.add_argument("--servers", nargs="+", default=["synthnode", "orthanc", "pynetdicom", "dcmtk"],
                   choices=list(SERVERS))  # plus the --tree names
    r.add_argument("--mp", type=int, default=2, help="acceptor processes of synthnode-mp")
    r.add_argument("--corpus", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--tree", action="append", metavar="NAME=PATH",
                   help="also run synthnode from this checkout (e.g. an earlier commit's "
                        "git worktree) as server NAME; repeatable")
    r.add_argument("--compressed", action="store_true",
                   help="also the compressed real corpus, sent as stored with dcmsend")
    r.add_argument("--no-series", action="store_true", help="skip the generated CT series")
    r.add_argument("--postgres", action="store_true",
                   help="synthnode's index on PostgreSQL (127.0.0.1:5432, a database per run)")
    r.add_argument("--cpus", default=None,
                   help="pin synthnode to these CPUs (taskset -c LIST), e.g. 0 or 0,1")
    r.add_argument("--profile", action="store_true")
    r.add_argument("--keep-profile", default=None, help="copy the merged cProfile stats here")
    r.add_argument("--flame", default=None, metavar="SVG",
                   help="record a py-spy flame graph of synthnode receiving the series on "
                        "1 association (pip install py-spy)")
    r.add_argument("--flame-assocs", type=int, default=1,
                   help="associations while recording --flame; an output name ending in "
                        ".txt records collapsed stacks with idle threads (py-spy --format raw "
                        "--idle: where association threads wait)")
    r.add_argument("--workdir", default=None)
    r.add_argument("--out", default=None)
    r.add_argument("--json", default=None)
    p = sub.add_parser("profile-serve")
    p.add_argument("config")
    p.add_argument("out")
    args = ap.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    else:
        profile_serve(args.config, args.out)


if __name__ == "__main__":
    main()
