"""A continuous syslog feed of the ledger to an audit record repository (IHE ATNA).

Every ledger entry becomes one RFC 5424 message (facility 13 "log audit", severity 6,
MSGID ``IHE+RFC-3881``, structured data ``[ledger@32473 seq="N"]``, the DICOM audit message
of PS3.15 A.5 as MSG), sent in ledger order over TLS (RFC 5425, the ATNA transport) or TCP
with octet-counting framing (RFC 6587 3.4.1, the same ``LEN SP MSG`` frames), or over UDP
(RFC 5426, one datagram per message).

Delivery (TLS / TCP): the feed follows the ledger from a persisted **cursor**, the last
entry whose message the repository's TCP stack acknowledged. Messages go out in batches;
after a batch the feed waits until the kernel's send queue is empty (Linux ``SIOCOUTQ``: no
byte unacknowledged), and only then moves the cursor and writes it to the cursor file
(temp file, fsync, rename). While the repository is down nothing is lost: the ledger itself
is the spool; the feed reconnects with a growing pause (``retry_max_s`` at most) and
replays from the cursor, in order. A repository can still lose what its TCP stack
acknowledged but its process never read (a crash with data in its socket buffer), so after
a broken connection the feed also re-sends the messages confirmed in the last
``replay_s`` seconds: delivery is at least once, and the ``seq`` in each message's
structured data lets the repository drop the duplicates. UDP has no delivery check: each
datagram counts as delivered when sent.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import socket
import ssl
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audit.ledger import Ledger, StoredEntry

log = logging.getLogger(__name__)

__all__ = ["FeedTarget", "SyslogFeed", "frame", "rfc5424"]

FACILITY_LOG_AUDIT = 13
SEVERITY_INFO = 6
#: Private Enterprise Number of the structured data element (RFC 5612 documentation PEN)
SD_ID = "ledger@32473"
BOM = b"\xef\xbb\xbf"


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def rfc5424(message: str, *, msgid: str, app: str = "synthnode", hostname: str | None = None,
            procid: str | None = None, sd: dict[str, str] | None = None,
            when: datetime | None = None, severity: int = SEVERITY_INFO) -> bytes:
    """One RFC 5424 syslog message (facility 13 "log audit"), MSG in UTF-8 with a BOM."""
    pri = FACILITY_LOG_AUDIT * 8 + severity
    ts = (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    host = (hostname or socket.gethostname() or "-")[:255]
    sd_text = "-"
    if sd:
        params = " ".join(f'{k}="{_sd_escape(v)}"' for k, v in sd.items())
        sd_text = f"[{SD_ID} {params}]"
    head = f"<{pri}>1 {ts} {host} {app[:48] or '-'} {procid or os.getpid()} {msgid[:32]} {sd_text} "
    return head.encode("utf-8") + BOM + message.encode("utf-8")


def frame(message: bytes) -> bytes:
    """Octet-counting frame ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 4.3, RFC 6587 3.4.1)."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass(frozen=True)
class FeedTarget:
    """Where the feed goes and how (``[audit.syslog]``)."""

    host: str
    port: int
    transport: str = "tls"  # tls | tcp | udp
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    @property
    def name(self) -> str:
        return f"{self.transport}://{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx


class DeliveryError(OSError):
    """The repository did not take a batch (connection lost, not acknowledged in time)."""


def unacknowledged(sock: socket.socket) -> int | None:
    """Bytes sent on ``sock`` that the peer's TCP has not acknowledged (Linux SIOCOUTQ,
    the same ioctl number as TIOCOUTQ); None where the platform cannot tell."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("i", buf)[0])


class _Connection:
    """One TLS / TCP / UDP connection to the repository."""

    def __init__(self, target: FeedTarget, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        if target.transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.connect((target.host, target.port))
            return
        raw = socket.create_connection((target.host, target.port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.transport == "tls":
            try:
                self.sock = target.tls_context().wrap_socket(
                    raw, server_hostname=target.server_name or target.host)
            except BaseException:
                raw.close()
                raise
        else:
            self.sock = raw

    def send(self, messages: Sequence[bytes]) -> None:
        if self.target.transport == "udp":
            for m in messages:
                self.sock.send(m)
            return
        self.sock.sendall(b"".join(frame(m) for m in messages))

    def closed_by_peer(self) -> bool:
        """True when the repository closed the connection (a syslog receiver never
        sends, so anything readable is the end of the stream)."""
        if self.target.transport == "udp":
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            self.sock.setblocking(False)
            try:
                data = self.sock.recv(1)
            finally:
                self.sock.setblocking(True)
                self.sock.settimeout(self.timeout)
            return data == b""
        except ssl.SSLWantReadError:
            return False
        except (OSError, ValueError):
            return True

    def confirm(self, deadline: float) -> None:
        """Return once every byte sent is acknowledged by the peer's TCP; raise
        :class:`DeliveryError` when the connection broke or ``deadline`` passed."""
        if self.target.transport == "udp":
            return
        raw = self.sock
        while True:
            left = unacknowledged(raw)
            if self.closed_by_peer():
                raise DeliveryError("the repository closed the connection")
            if left is None or left == 0:
                return
            if time.monotonic() > deadline:
                raise DeliveryError(f"{left} bytes not acknowledged in time")
            time.sleep(0.005)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class SyslogFeed:
    """Follows the ledger and sends every entry to the repository (see the module docs).

    Parameters
    ----------
    ledger
        The ledger to follow.
    render
        Ledger entry -> MSG text (the node's DICOM audit message renderer).
    target
        The repository.
    cursor_file
        Where the last delivered entry number is kept.
    start
        ``"beginning"`` or ``"now"``: where a feed without a cursor file starts.
    app_name, batch, poll_s, retry_max_s, replay_s, ack_timeout_s
        RFC 5424 APP-NAME; messages per confirmed write; idle look at the ledger; longest
        pause between reconnection attempts; how far back a broken connection replays;
        how long a batch may stay unacknowledged.
    """

    MSGID = "IHE+RFC-3881"

    def __init__(self, ledger: Ledger, render: Callable[[StoredEntry], str], target: FeedTarget,
                 cursor_file: Path, *, start: str = "beginning", app_name: str = "synthnode",
                 batch: int = 200, poll_s: float = 1.0, retry_max_s: float = 60.0,
                 replay_s: float = 10.0, ack_timeout_s: float = 30.0) -> None:
        self.ledger = ledger
        self.render = render
        self.target = target
        self.cursor_file = Path(cursor_file)
        self.start_at = start
        self.app_name = app_name
        self.batch = batch
        self.poll_s = poll_s
        self.retry_max_s = retry_max_s
        self.replay_s = replay_s
        self.ack_timeout_s = ack_timeout_s
        self.cursor = self._load_cursor()
        self.connected = False
        self.last_error: str | None = None
        self.sent = 0
        self._history: deque[tuple[float, int]] = deque()  # (confirmed at, cursor before)
        self._conn: _Connection | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._hostname = socket.gethostname() or "-"

    # -- cursor ------------------------------------------------------------------------
    def _load_cursor(self) -> int:
        try:
            data = json.loads(self.cursor_file.read_text(encoding="utf-8"))
            return int(data["seq"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"syslog feed cursor {self.cursor_file} is damaged ({exc}); "
                             "remove it to start again from [audit.syslog] start") from None
        return -1 if self.start_at == "beginning" else self.ledger.size() - 1

    def _save_cursor(self) -> None:
        path = self.cursor_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        data = json.dumps({"seq": self.cursor, "target": self.target.name,
                           "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="syslog-feed", daemon=True)
        self._thread.start()
        log.info("syslog feed to %s started at ledger entry %d", self.target.name,
                 self.cursor + 1)

    def wake(self) -> None:
        """Look at the ledger now (e.g. after an append) instead of at the next poll."""
        self._wake.set()

    def stop(self, drain_s: float = 5.0) -> None:
        """Send what the ledger holds (for up to ``drain_s`` seconds), then stop."""
        t = self._thread
        if t is None:
            return
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and self.connected and self.backlog() > 0:
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        t.join(timeout=max(1.0, self.ack_timeout_s + 5))
        self._thread = None
        self._disconnect()

    def backlog(self) -> int:
        """Ledger entries not yet delivered."""
        return max(0, self.ledger.size() - 1 - self.cursor)

    def status(self) -> dict[str, Any]:
        return {"target": self.target.name, "cursor": self.cursor, "connected": self.connected,
                "backlog": self.backlog(), "sent": self.sent, "last_error": self.last_error}

    # -- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        pause = 0.5
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._connect()
                    pause = 0.5
                if not self._send_some():
                    self._idle()
            except Exception as exc:
                self._broken(exc)
                self._stop.wait(pause)
                pause = min(pause * 2, self.retry_max_s)

    def _connect(self) -> None:
        self._conn = _Connection(self.target, timeout=self.ack_timeout_s)
        self.connected = True
        if self.last_error:
            log.info("syslog feed: connected to %s again; replaying from ledger entry %d",
                     self.target.name, self.cursor + 1)
        self.last_error = None

    def _idle(self) -> None:
        conn = self._conn
        if conn is not None and conn.closed_by_peer():
            # an idle close by the repository is expected (INFO): reconnect when there is
            # work, and send the last messages again in case it went down without reading
            log.info("syslog feed: %s closed the idle connection", self.target.name)
            self._disconnect()
            self._rewind()
        self._wake.wait(self.poll_s)
        self._wake.clear()

    def _send_some(self) -> bool:
        """Send and confirm one batch; False when there was nothing to send."""
        size = self.ledger.size()
        first = self.cursor + 1
        if first >= size:
            return False
        entries = list(self.ledger.entries(first, min(size, first + self.batch)))
        if not entries:
            return False
        messages = [self._message(e) for e in entries]
        conn = self._conn
        assert conn is not None
        conn.send(messages)
        conn.confirm(time.monotonic() + self.ack_timeout_s)
        before = self.cursor
        self.cursor = entries[-1].seq
        self.sent += len(entries)
        self._save_cursor()
        now = time.monotonic()
        self._history.append((now, before))
        while self._history and self._history[0][0] < now - self.replay_s:
            self._history.popleft()
        return True

    def _message(self, e: StoredEntry) -> bytes:
        try:
            text, msgid = self.render(e), self.MSGID
        except Exception:  # never stall the feed on one entry: send its leaf as it is
            log.exception("syslog feed: cannot render ledger entry %d", e.seq)
            text, msgid = e.data.decode("utf-8", "replace"), "LEDGER"
        return rfc5424(text, msgid=msgid, app=self.app_name, hostname=self._hostname,
                       sd={"seq": str(e.seq), "leaf": e.leaf_hash.hex()})

    def _rewind(self) -> None:
        """After a lost connection: move the cursor back before the batches confirmed in
        the last ``replay_s`` seconds (the repository may have died without reading them)."""
        if self.target.transport == "udp":
            return
        horizon = time.monotonic() - self.replay_s
        recent = [before for t, before in self._history if t >= horizon]
        if recent and min(recent) < self.cursor:
            log.info("syslog feed: sending entries %d..%d to %s again (at least once)",
                     min(recent) + 1, self.cursor, self.target.name)
            self.cursor = min(recent)
            self._save_cursor()
        self._history.clear()

    def _broken(self, exc: BaseException) -> None:
        was = self.connected
        self._disconnect()
        self._rewind()
        text = f"{type(exc).__name__}: {exc}"
        if text != self.last_error or was:
            n = self.backlog()
            log.warning("syslog feed to %s: %s; %d entr%s waiting (kept in the ledger)",
                        self.target.name, text, n, "y" if n == 1 else "ies")
        self.last_error = text

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self.connected = False
