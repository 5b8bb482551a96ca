"""Perceptual fingerprints of output slices: identify an output when its mark is gone.

A leaked rendering may have lost the mark (lung-window JPEG, heavy resize, a photo of a
screen). Every output slice therefore gets a robust perceptual hash, recorded with the
output's ``output.created`` ledger event (payload ``fingerprints``), and
:class:`FingerprintIndex` finds the closest recorded slices to any image.

Hash (scheme ``dctr1``): the grey image is **rank-normalised** (each value replaced by its
empirical CDF: invariant to any increasing intensity map, i.e. rescale, windowing without
saturation, brightness / contrast, gamma), then **geometry-normalised** by its intensity
moments (centroid and spread of the squared ranks: a crop that removes mostly background, a
shift and a resize leave them nearly unchanged) and resampled to 32 x 32 over +-1.5 spreads
around the centroid; the 12 x 12 lowest 2-D DCT-II coefficients without the DC term give
143 bits (coefficient > median). A display window that saturates part of the image is not
an increasing map of the whole slice, so each slice is hashed in several renderings: the
stored values and three standard windows (CT: soft tissue 40 / 400, brain 40 / 80, lung
-600 / 1500 HU; other images: the 1 - 99 and 25 - 75 percentile ranges and the full range).

Matching: Hamming distance to every recorded rendering (an entry's distance is its closest
rendering). **Crop search** (query side only; the recorded hashes do not change): a crop
removes a margin of the slice, which moves the intensity moments and with them the whole
hash. The query is therefore also hashed after padding it back with its own edge values by
each of :data:`UNCROP_PADS` (3 or 8 % of its height / width on the top, bottom, left and
right independently: 16 patterns), and an entry's
distance is ``min(plain distance, searched distance + UNCROP_PENALTY)``, the penalty paying
for the extra hypotheses (set in the benchmark so that the searched distance of unrelated
slices is no closer than their plain one).

A match is reported at a distance <= :data:`MATCH_DISTANCE` bits, chosen in the benchmark so
that unrelated slices (real and phantom, not in the ledger) match a ledger of 100,000
recorded slices in at most 0.1 % of lookups (bench/RESULTS.md; flipped / cropped / noisier
copies of a recorded slice's source are not unrelated: 1.4 % of those matched). The score is
calibrated against the same measurement: (NULL_MEAN - distance) / NULL_SD, where NULL_MEAN and
NULL_SD are the mean and sd of the distance from an unrelated slice to its closest recorded slice in
that ledger: a score of 3 means three null standard deviations closer than unrelated slices
come. Candidates above the match distance are still listed (closest first): after JPEG q75
or a 0.5x resize the right slice is usually the closest one at 6 - 8 bits.

Not handled: rotations other than none (90-degree rotations and flips change the hash),
perspective (a photo of a screen at an angle), crops beyond the searched margins (about 10 %
a side) and crops that keep only part of the body.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.fft import dctn

SCHEME = "dctr1"
GRID = 32
LOW = 12
SPAN = 1.5
BITS = LOW * LOW - 1  # 143
NBYTES = (BITS + 7) // 8  # 18
#: distance from an unrelated slice (real and phantom, not a copy of a recorded one) to its
#: closest slice in a ledger of 100,000, crop search included (mean, sd; bench/bench_watermark.py
#: --fingerprint of 2026-12-07, bench/RESULTS.md)
NULL_MEAN = 32.5
NULL_SD = 11.7
#: largest distance reported as a match: false-match rate <= 0.1 % on 3,500 unrelated slices
#: against that ledger (3 of another 3,500 matched); the closest candidates are listed anyway
MATCH_DISTANCE = 11
#: crop search: margins (top, bottom, left, right; fractions of the query's height / width)
#: the query is padded back by, with its edge values, before it is hashed again
UNCROP_PADS: tuple[tuple[float, float, float, float], ...] = tuple(
    (t, b, left, r) for t in (0.03, 0.08) for b in (0.03, 0.08) for left in (0.03, 0.08)
    for r in (0.03, 0.08))
#: bits added to a searched (padded) hypothesis' distance: the price of the extra hypotheses
UNCROP_PENALTY = 2
#: CT display windows (level, width) in HU
CT_WINDOWS = ((40.0, 400.0), (40.0, 80.0), (-600.0, 1500.0))
_WORDS = (NBYTES + 7) // 8
_POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _grey(image: NDArray) -> NDArray[np.float64]:
    x = np.asarray(image)
    if x.ndim == 3 and x.shape[-1] in (3, 4):
        x = x[..., :3].astype(np.float64).mean(axis=-1)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D image or RGB(A), got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def rank_normalise(image: NDArray) -> NDArray[np.float64]:
    """Each value replaced by its mid-rank empirical CDF in (0, 1)."""
    x = _grey(image)
    flat = x.ravel()
    if flat.size == 0:
        raise ValueError("empty image")
    lo, hi = float(flat.min()), float(flat.max())
    if hi - lo < (1 << 20) and np.all(flat == np.rint(flat)):  # integers: counting, O(n)
        idx = (flat - lo).astype(np.int64)
        cnt = np.bincount(idx)
        cdf = (np.cumsum(cnt) - cnt / 2.0) / flat.size
        return cdf[idx].reshape(x.shape)
    _u, inv, cnt = np.unique(flat, return_inverse=True, return_counts=True)
    cdf = (np.cumsum(cnt) - cnt / 2.0) / flat.size
    return cdf[inv].reshape(x.shape)


def _canonical(r: NDArray[np.float64]) -> NDArray[np.float64]:
    w = r * r
    tot = float(w.sum())
    ny, nx = r.shape
    if tot <= 0.0:
        return np.zeros((GRID, GRID))
    yy = np.arange(ny, dtype=np.float64)
    xx = np.arange(nx, dtype=np.float64)
    wy, wx = w.sum(axis=1), w.sum(axis=0)
    cy, cx = float(wy @ yy) / tot, float(wx @ xx) / tot
    sy = np.sqrt(float(wy @ (yy - cy) ** 2) / tot)
    sx = np.sqrt(float(wx @ (xx - cx) ** 2) / tot)
    s = max(sy, sx, 1.0)
    g = np.linspace(-SPAN, SPAN, GRID) * s
    gy, gx = np.meshgrid(cy + g, cx + g, indexing="ij")
    smooth = ndimage.uniform_filter(r, max(1, int(2 * SPAN * s / GRID)))
    return ndimage.map_coordinates(smooth, [gy, gx], order=1, cval=0.0)


def slice_hash(image: NDArray) -> bytes:
    """The 143-bit perceptual hash of one image (any size, dtype, grey or RGB), packed."""
    c = _canonical(rank_normalise(image))
    coef = dctn(c - c.mean(), norm="ortho")[:LOW, :LOW].ravel()[1:]
    bits = (coef > np.median(coef)).astype(np.uint8)
    return np.packbits(bits).tobytes()


def query_hashes(image: NDArray) -> list[bytes]:
    """The hashes a query is looked up with: the plain hash first, then the crop search's
    (the image padded back by each of :data:`UNCROP_PADS` with its edge values)."""
    x = _grey(image)
    out = [slice_hash(x)]
    ny, nx = x.shape
    for t, b, left, r in UNCROP_PADS:
        pad = ((round(t * ny), round(b * ny)), (round(left * nx), round(r * nx)))
        out.append(slice_hash(np.pad(x, pad, mode="edge")))
    return out


def _window8(values: NDArray[np.float64], level: float, width: float) -> NDArray[np.uint8]:
    lo = level - width / 2.0
    return np.clip(np.rint((values - lo) / width * 255.0), 0, 255).astype(np.uint8)


def renderings(stored: NDArray, *, hu: bool, slope: float = 1.0,
               intercept: float = 0.0) -> list[NDArray]:
    """The renderings of one stored slice that are hashed: the stored values plus three
    windows (CT in HU through slope / intercept; other images by percentiles)."""
    x = np.asarray(stored, dtype=np.float64)
    out: list[NDArray] = [x]
    if hu:
        phys = x * slope + intercept
        out += [_window8(phys, lv, wd) for lv, wd in CT_WINDOWS]
    else:
        p1, p25, p50, p75, p99 = np.percentile(x, [1, 25, 50, 75, 99])
        out += [_window8(x, (p1 + p99) / 2, max(p99 - p1, 1.0)),
                _window8(x, p50, max(p75 - p25, 1.0)),
                _window8(x, (x.min() + x.max()) / 2, max(float(x.max() - x.min()), 1.0))]
    return out


def slice_fingerprint(stored: NDArray, *, hu: bool, slope: float = 1.0,
                      intercept: float = 0.0) -> list[str]:
    """Hex hashes of the renderings of one stored slice (what the ledger records)."""
    return [slice_hash(r).hex() for r in renderings(stored, hu=hu, slope=slope,
                                                     intercept=intercept)]


def volume_fingerprints(stored: NDArray, *, hu: bool, slope: float = 1.0,
                        intercept: float = 0.0) -> dict[str, object]:
    """``output.created`` payload value for a (slices, rows, columns) stored volume: the
    scheme and one list of rendering hashes per slice (slice z of the volume: instance z of
    a single-frame series, frame z + 1 of a multi-frame one)."""
    vol = np.asarray(stored)
    if vol.ndim == 2:
        vol = vol[None]
    return {"scheme": SCHEME,
            "slices": [slice_fingerprint(s, hu=hu, slope=slope, intercept=intercept)
                       for s in vol]}


def hamming(a: bytes, b: bytes) -> int:
    """Bits that differ between two packed hashes."""
    x = np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
    return int(_POP[x].sum())


@dataclass(frozen=True)
class Match:
    """One recorded slice close to a query: its ledger entry and where it sits."""

    distance: int
    score: float  # calibrated: (NULL_MEAN - distance) / NULL_SD
    matched: bool  # distance <= MATCH_DISTANCE
    seq: int
    series_uid: str
    sop_uid: str | None
    slice_index: int


@dataclass
class FingerprintIndex:
    """Recorded slice fingerprints, searchable by Hamming distance (brute force over packed
    bits: 100,000 slices x 4 renderings in tens of milliseconds, see bench/RESULTS.md)."""

    hashes: NDArray[np.uint8] = field(default_factory=lambda: np.zeros((0, 4, NBYTES), np.uint8))
    seqs: list[int] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    sops: list[str | None] = field(default_factory=list)
    slices: list[int] = field(default_factory=list)
    _pending: list[NDArray[np.uint8]] = field(default_factory=list, repr=False)
    _cache: NDArray[np.uint64] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: int, series_uid: str, sop_uid: str | None, slice_index: int,
            hex_hashes: Sequence[str]) -> None:
        """Record one slice (its rendering hashes, hex)."""
        arr = np.zeros((4, NBYTES), np.uint8)
        hs = [bytes.fromhex(h) for h in hex_hashes][:4]
        if not hs or any(len(h) != NBYTES for h in hs):
            raise ValueError(f"expected 1 - 4 hashes of {NBYTES} bytes")
        for i in range(4):
            arr[i] = np.frombuffer(hs[min(i, len(hs) - 1)], np.uint8)
        self._pending.append(arr)
        self.seqs.append(seq)
        self.series.append(series_uid)
        self.sops.append(sop_uid)
        self.slices.append(slice_index)

    def add_event(self, seq: int, payload: dict[str, object]) -> int:
        """Record the slices of one ``output.created`` payload; returns how many."""
        fp = payload.get("fingerprints")
        if not isinstance(fp, dict) or fp.get("scheme") != SCHEME:
            return 0
        series_uid = str(payload.get("output_series_uid", ""))
        sops = list(payload.get("output_sop_uids") or [])  # type: ignore[call-overload]
        per_instance = str(payload.get("output_format", "sc")) == "sc"
        n = 0
        for z, hs in enumerate(fp.get("slices") or []):  # type: ignore[attr-defined]
            sop = (sops[z] if per_instance and z < len(sops) else (sops[0] if sops else None))
            self.add(seq, series_uid, sop, z, hs)
            n += 1
        return n

    def _packed(self) -> NDArray[np.uint8]:
        if self._pending:
            self.hashes = np.concatenate([self.hashes, np.stack(self._pending)])
            self._pending = []
        return self.hashes

    def _plain(self, query: bytes) -> NDArray[np.uint8]:
        """Per recorded slice: the smallest Hamming distance of ``query`` over its renderings."""
        w = self._words()
        n = w.shape[1] // 4
        if not n:
            return np.zeros(0, np.uint8)
        q = np.zeros(_WORDS * 8, np.uint8)
        q[:NBYTES] = np.frombuffer(query, np.uint8)
        qw = q.view(np.uint64)
        buf = np.empty(w.shape[1], np.uint64)
        cnt = np.empty(w.shape[1], np.uint8)
        d = np.bitwise_count(np.bitwise_xor(w[0], qw[0], out=buf))
        for i in range(1, _WORDS):
            d += np.bitwise_count(np.bitwise_xor(w[i], qw[i], out=buf), out=cnt)
        v = d.reshape(n, 4)
        return np.minimum(np.minimum(v[:, 0], v[:, 1]), np.minimum(v[:, 2], v[:, 3]))

    def distances(self, query: bytes | Sequence[bytes]) -> NDArray[np.int64]:
        """Per recorded slice: the smallest Hamming distance over its renderings; for the
        hashes of :func:`query_hashes` (plain first, then the crop search's), the smaller of
        the plain distance and the searched one plus :data:`UNCROP_PENALTY`."""
        qs = [query] if isinstance(query, bytes) else list(query)
        d = self._plain(qs[0]).astype(np.int64)
        if len(qs) > 1 and len(d):
            s = self._plain(qs[1])
            for q in qs[2:]:
                np.minimum(s, self._plain(q), out=s)
            np.minimum(d, s.astype(np.int64) + UNCROP_PENALTY, out=d)
        return d

    def _words(self) -> NDArray[np.uint64]:
        """The packed hashes as 64-bit words (zero-padded), word-major: (words, slices x 4)."""
        h = self._packed()
        if self._cache is None or self._cache.shape[1] != 4 * len(h):
            pad = np.zeros((len(h), 4, _WORDS * 8), np.uint8)
            pad[:, :, :NBYTES] = h
            self._cache = np.ascontiguousarray(pad.view(np.uint64).reshape(-1, _WORDS).T)
        return self._cache

    def search(self, image: NDArray, k: int = 5) -> list[Match]:
        """The ``k`` closest recorded slices to ``image`` (closest first, crop search
        included), scored."""
        return self.search_hash(query_hashes(image), k)

    def search_hash(self, query: bytes | Sequence[bytes], k: int = 5) -> list[Match]:
        """As :meth:`search` for a hash, or the hashes of :func:`query_hashes`."""
        d = self.distances(query)
        if not len(d):
            return []
        order = np.argsort(d, kind="stable")[:k]
        return [Match(int(d[i]), round((NULL_MEAN - float(d[i])) / NULL_SD, 2),
                      bool(d[i] <= MATCH_DISTANCE), self.seqs[i], self.series[i], self.sops[i],
                      self.slices[i]) for i in order]
