"""Ledger test helpers: a ledger environment, numbered events, and one pipeline's events
(received -> completed -> job -> output -> dispatch) with the UIDs they use."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from audit.events import Event, EventType, Outcome
from audit.service import AuditService, open_ledger
from node.db import make_engine


@dataclass
class LedgerEnv:
    url: str
    key_file: Path
    checkpoint_file: Path
    service: AuditService

    def reopen(self) -> AuditService:
        return open_ledger(make_engine(self.url), key_file=self.key_file,
                           checkpoint_file=self.checkpoint_file, origin="test.example/ledger")


def make_event(i: int, kind: EventType = EventType.INSTANCE_RECEIVED, **subject: str) -> Event:
    subject = {"study_uid": "1.2.826.0.1.3680043.2.1125.1", "sop_uid": f"1.2.826.0.1.3680043.2.1125.1.{i}",
               **subject}
    return Event(kind, f"ae:MOD{i % 3}", subject=subject, payload={"sha256": f"{i:064x}", "i": i})


#: UIDs of :func:`pipeline_events`: the study, its source series, the output series, and
#: an unrelated study
STUDY = "1.2.826.0.1.3680043.8.498.1"
SRC = "1.2.826.0.1.3680043.8.498.1.1"
OUT = "1.2.826.0.1.3680043.8.498.1.99"
OTHER = "1.2.826.0.1.3680043.8.498.2"


def pipeline_events() -> list[Event]:
    """A received -> completed -> job -> output -> dispatch chain, a model refusal, and one
    instance of another study."""
    evs = [Event(EventType.ASSOCIATION_ACCEPTED, "ae:CT01", payload={"peer_address": "127.0.0.1"})]
    for i in range(3):
        evs.append(Event(EventType.INSTANCE_RECEIVED, "ae:CT01",
                         subject={"study_uid": STUDY, "series_uid": SRC, "sop_uid": f"{SRC}.{i}",
                                  "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"},
                         payload={"sha256": f"{i:064x}", "calling_ae": "CT01"}))
    evs.append(Event(EventType.INSTANCE_RECEIVED, "ae:CT01",
                     subject={"study_uid": OTHER, "series_uid": OTHER + ".1", "sop_uid": OTHER + ".1.1"}))
    evs.append(Event(EventType.STUDY_COMPLETED, "component:pipeline", subject={"study_uid": STUDY},
                     payload={"series_uids": [SRC]}))
    job = {"job_id": "job-7", "model_id": "ct-restore", "study_uid": STUDY}
    params = {"source_series_uids": [SRC], "weights_sha256": "ab" * 32, "seed": 1234, "device": "cpu",
              "parameters": {"steps": 8}}
    evs += [Event(EventType.JOB_QUEUED, "component:pipeline", subject=job, payload=params),
            Event(EventType.JOB_STARTED, "component:worker", subject=job, payload=params),
            Event(EventType.JOB_FINISHED, "component:worker", subject=job, payload=params),
            Event(EventType.OUTPUT_CREATED, "component:worker",
                  subject={**job, "series_uid": OUT},
                  payload={"source_series_uids": [SRC], "output_series_uid": OUT,
                           "output_sop_uids": [f"{OUT}.{i}" for i in range(3)], "sha256": ["cd" * 32] * 3,
                           "watermark_payload": "00ff00ff00ff"}),
            Event(EventType.DISPATCH_ATTEMPTED, "component:dispatch",
                  subject={"series_uid": OUT, "destination": "PACS", "study_uid": STUDY}),
            Event(EventType.DISPATCH_FAILED, "component:dispatch", Outcome.MINOR_FAILURE,
                  subject={"series_uid": OUT, "destination": "PACS", "study_uid": STUDY},
                  payload={"error": "association rejected"}),
            Event(EventType.DISPATCH_SUCCEEDED, "component:dispatch",
                  subject={"series_uid": OUT, "destination": "PACS", "job_id": "job-7"},
                  payload={"sop_uids": [f"{OUT}.{i}" for i in range(3)]}),
            Event(EventType.MODEL_REFUSED, "component:modelgate", Outcome.SERIOUS_FAILURE,
                  subject={"model_id": "evil"}, payload={"reason": "unsigned"})]
    return evs
