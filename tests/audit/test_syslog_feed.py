"""The continuous ATNA feed (audit.syslog) against a real TLS syslog receiver on loopback
(RFC 5425, mutual TLS) that goes down and comes back: every ledger entry arrives, in
order, nothing is lost, the cursor survives a restart of the feed."""
from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.ledger import make_event
from tests.support.net import wait_for
from tests.support.syslog import SyslogReceiver, make_pki

from audit.atna import dicom_audit_xml
from audit.ledger import Ledger
from audit.syslog import FeedTarget, SyslogFeed
from node.db import make_engine, upgrade

RFC5424 = re.compile(rb"^<110>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ synthnode \d+ "
                     rb"IHE\+RFC-3881 \[ledger@32473 seq=\"(\d+)\" leaf=\"[0-9a-f]{64}\"\] "
                     rb"\xef\xbb\xbf(<AuditMessage>.*</AuditMessage>)$", re.DOTALL)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield Ledger(engine)
    engine.dispose()


def unique_in_order(seqs: list[int]) -> list[int]:
    return list(dict.fromkeys(seqs))


def test_feed_survives_a_receiver_that_goes_down_and_comes_back(ledger: Ledger,
                                                                 tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    receiver = SyslogReceiver(pki).start()
    target = FeedTarget("127.0.0.1", receiver.port, "tls", ca_file=pki.ca,
                        cert_file=pki.client_cert, key_file=pki.client_key,
                        server_name="localhost")
    cursor = tmp_path / "feed.cursor"
    feed = SyslogFeed(ledger, dicom_audit_xml, target, cursor, poll_s=0.05, retry_max_s=0.3,
                      batch=4)
    try:
        ledger.append_many([make_event(i) for i in range(6)])
        feed.start()
        wait_for(lambda: set(receiver.seqs()) >= set(range(6)), 20, "first entries")
        wait_for(lambda: json.loads(cursor.read_text())["seq"] == 5, 10, "cursor at 5")

        receiver.stop()  # the repository goes down, connections dropped
        ledger.append_many([make_event(i) for i in range(6, 15)])
        time.sleep(1.0)  # the feed tries, fails, keeps the entries in the ledger
        assert not feed.connected and feed.backlog() >= 9
        assert json.loads(cursor.read_text())["seq"] <= 5  # nothing unconfirmed is counted

        receiver.start()  # back on the same port
        wait_for(lambda: set(receiver.seqs()) >= set(range(15)), 30, "replay after outage")
        assert unique_in_order(receiver.seqs()) == list(range(15))  # in order, none lost
        wait_for(lambda: feed.backlog() == 0, 10, "backlog drained")
        assert json.loads(cursor.read_text())["seq"] == 14
        assert receiver.connections >= 2
    finally:
        feed.stop()

    # every message: RFC 5424 (facility 13 log audit, severity 6), MSGID IHE+RFC-3881, the
    # ledger seq in structured data, a PS3.15 A.5 AuditMessage as MSG
    for raw in receiver.messages:
        m = RFC5424.match(raw)
        assert m, raw[:120]
        ET.fromstring(m.group(2))

    # a new feed on the same cursor (a node restart) sends only what is new
    before = len(receiver.messages)
    again = SyslogFeed(ledger, dicom_audit_xml, target, cursor, poll_s=0.05)
    try:
        again.start()
        ledger.append(make_event(99))
        wait_for(lambda: 15 in receiver.seqs(), 20, "entry 15")
        time.sleep(0.3)
        assert receiver.seqs()[before:] == [15]
    finally:
        again.stop()
        receiver.close()


def test_what_a_crashed_repository_never_read_is_sent_again(ledger: Ledger,
                                                            tmp_path: Path) -> None:
    """Messages the repository's TCP acknowledged but its process never read (it crashed
    with them in its socket buffer) are sent again after the reconnection (at least once;
    the seq lets the repository drop duplicates)."""
    receiver = SyslogReceiver().start()  # plain TCP, RFC 6587 octet counting
    feed = SyslogFeed(ledger, dicom_audit_xml, FeedTarget("127.0.0.1", receiver.port, "tcp"),
                      tmp_path / "c", poll_s=0.05, retry_max_s=0.3)
    try:
        ledger.append_many([make_event(i) for i in range(3)])
        feed.start()
        wait_for(lambda: set(receiver.seqs()) == {0, 1, 2}, 20, "first entries")
        receiver.frozen.set()  # the repository stops reading...
        ledger.append_many([make_event(i) for i in range(3, 8)])
        wait_for(lambda: feed.cursor == 7, 20, "TCP-acknowledged")
        assert not set(range(3, 8)) <= set(receiver.seqs())  # (one may have been in reading)
        receiver.stop()  # ...and crashes with 3..7 unread
        receiver.start()
        ledger.append(make_event(8))
        wait_for(lambda: set(receiver.seqs()) >= set(range(9)), 30, "the unread ones again")
        assert unique_in_order(receiver.seqs()) == list(range(9))
    finally:
        feed.stop()
        receiver.close()


def test_feed_refuses_an_untrusted_repository(ledger: Ledger, tmp_path: Path) -> None:
    """A repository whose certificate the configured CA did not sign gets nothing."""
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    receiver = SyslogReceiver(pki).start()
    feed = SyslogFeed(ledger, dicom_audit_xml,
                      FeedTarget("127.0.0.1", receiver.port, "tls", ca_file=other.ca,
                                 cert_file=other.client_cert, key_file=other.client_key),
                      tmp_path / "c", poll_s=0.05, retry_max_s=0.2)
    try:
        ledger.append(make_event(1))
        feed.start()
        wait_for(lambda: feed.last_error is not None, 10, "a TLS error")
        assert "CERTIFICATE_VERIFY_FAILED" in feed.last_error
        assert receiver.messages == [] and feed.backlog() == 1
    finally:
        feed.stop(drain_s=0)
        receiver.close()
