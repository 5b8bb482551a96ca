"""Error control for the watermark payload.

Info word (64 bits) = payload (48 bits) || CRC-16/CCITT-FALSE over (key id, payload), XOR a
keyed scrambling sequence so that every payload, including 0, gives a balanced codeword.
Channel code: the NASA standard rate-1/2, constraint-length-7 convolutional code
(generators 171, 133 octal), zero-terminated (6 tail bits): 140 coded bits, decoded with a
soft-decision Viterbi decoder (max-correlation metric, vectorised over the 64 states).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

PAYLOAD_BITS = 48
CRC_BITS = 16
INFO_BITS = PAYLOAD_BITS + CRC_BITS
K = 7  # constraint length
_MEM = K - 1
N_STATES = 1 << _MEM
GENERATORS = (0o171, 0o133)
CODED_BITS = (INFO_BITS + _MEM) * len(GENERATORS)  # 140


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def int_to_bits(value: int, n: int) -> NDArray[np.uint8]:
    """Big-endian bits of ``value`` (n bits)."""
    return np.array([(value >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.uint8)


def bits_to_int(bits: NDArray[np.uint8]) -> int:
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return value


def _parity(x: int) -> int:
    return bin(x).count("1") & 1


# Trellis tables. State = last 6 input bits (newest in the LSB); register = state<<1 | input.
_NEXT = np.array([[((s << 1) | b) & (N_STATES - 1) for b in (0, 1)] for s in range(N_STATES)])
_OUT = np.array(
    [[[_parity(((s << 1) | b) & g) for g in GENERATORS] for b in (0, 1)] for s in range(N_STATES)],
    dtype=np.int8,
)  # (state, input, output index)
# For each new state ns: its two predecessors (ns >> 1) | p << 5 and the input bit ns & 1.
_PRED = np.array([[(ns >> 1) | (p << (_MEM - 1)) for p in (0, 1)] for ns in range(N_STATES)])
_PRED_IN = np.array([ns & 1 for ns in range(N_STATES)])
# +-1 signal of each predecessor branch: (ns, p, output index); bit 0 -> +1, bit 1 -> -1.
_BRANCH_SIGN = np.array(
    [[1 - 2 * _OUT[_PRED[ns, p], _PRED_IN[ns]] for p in (0, 1)] for ns in range(N_STATES)],
    dtype=np.float64,
)


def conv_encode(info: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Encode bits with the K=7 rate-1/2 code, appending 6 zero tail bits."""
    state = 0
    out: list[int] = []
    for b in list(info) + [0] * _MEM:
        out.extend(int(v) for v in _OUT[state, int(b)])
        state = int(_NEXT[state, int(b)])
    return np.array(out, dtype=np.uint8)


def viterbi_decode(soft: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Soft-decision Viterbi decoding of :func:`conv_encode` output.

    Parameters
    ----------
    soft
        One real value per coded bit, positive meaning bit 0 (any scale: the metric is a
        correlation, so only relative values matter).

    Returns
    -------
    numpy.ndarray
        The decoded information bits (tail removed).
    """
    n_out = len(GENERATORS)
    y = np.asarray(soft, dtype=np.float64).reshape(-1, n_out)
    steps = y.shape[0]
    metric = np.full(N_STATES, -np.inf)
    metric[0] = 0.0
    choices = np.empty((steps, N_STATES), dtype=np.int8)
    for t in range(steps):
        branch = metric[_PRED] + _BRANCH_SIGN @ y[t]  # (ns, p)
        if t >= steps - _MEM:  # tail: only input 0 allowed
            branch[_PRED_IN == 1] = -np.inf
        pick = np.argmax(branch, axis=1)
        choices[t] = pick
        metric = branch[np.arange(N_STATES), pick]
    state = 0
    bits = np.empty(steps, dtype=np.uint8)
    for t in range(steps - 1, -1, -1):
        bits[t] = _PRED_IN[state]
        state = int(_PRED[state, choices[t, state]])
    return bits[: steps - _MEM]
