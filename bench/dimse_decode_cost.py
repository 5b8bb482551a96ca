"""What pynetdicom spends turning a received C-STORE-RQ into its primitive, in process:
``DIMSEMessage.decode_msg`` of the P-DATA primitives of one request (the command set
decoded with pydicom; a 1,000-byte data set, whose bytes are only appended), and then
``message_to_primitive``. This is the part a direct command-set decoder could replace.

Usage (the figure behind bench/results/ingest.md "What is left")::

    python bench/dimse_decode_cost.py [--n 5000]
"""
from __future__ import annotations

import argparse
import time
from io import BytesIO

from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    n = ap.parse_args().n
    prim = C_STORE()
    prim.MessageID = 7
    prim.AffectedSOPClassUID = CTImageStorage
    prim.AffectedSOPInstanceUID = generate_uid()
    prim.Priority = 2
    prim.DataSet = BytesIO(b"\0" * 1000)
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    pdatas = list(msg.encode_msg(1, 1 << 20))
    t0 = time.perf_counter()
    for _ in range(n):
        m = DIMSEMessage()
        for p in pdatas:
            m.decode_msg(p)
    t1 = time.perf_counter()
    for _ in range(n):
        m = DIMSEMessage()
        for p in pdatas:
            m.decode_msg(p)
        m.message_to_primitive()
    t2 = time.perf_counter()
    print(f"decode_msg: {(t1 - t0) / n * 1e6:.0f} us per request; "
          f"decode_msg + message_to_primitive: {(t2 - t1) / n * 1e6:.0f} us")


if __name__ == "__main__":
    main()
