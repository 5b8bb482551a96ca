"""Real CT slices for validating the engine: the CT test files shipped in pydicom / pydicom-data.

The engine never reads DICOM, so this module (node side) decodes the files with pydicom
(+ pylibjpeg / openjpeg for JPEG 2000 and JPEG Lossless), converts them to HU through the
node's own ingest path (:func:`node.volume.assemble`: Rescale Slope / Intercept, or the
Pixel Value Transformation functional group for enhanced CT), and hands
:class:`engine.evaluate.Case` objects with a simulated low dose to the evaluation.

Low dose on a real scan: the scan already carries its own quantum noise. Treating it as full
dose, a dose fraction ``d`` needs extra noise of variance ``(1/d - 1)`` times the full-dose
variance; :func:`engine.degrade.low_dose_ct` adds noise of variance ``1/d'`` times that for
dose ``d'``, so it is called with ``d' = d / (1 - d)`` (Yu et al., Med Phys 39:5035, 2012,
eq. 8 in the same spirit). The reference is the original slice, noise included, so PSNR /
SSIM against it are bounded by the scan's own noise.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass

import numpy as np

from engine.api import Intensity, Volume

log = logging.getLogger(__name__)

# pydicom / pydicom-data CT files, each a distinct image (693_UNCR / 693_J2KI hold the same
# slice as 693_J2KR; the lossless JPEG 2000 one is used).
REAL_CT_FILES = (
    "CT_small.dcm",  # 128 x 128, Explicit VR Little Endian
    "693_J2KR.dcm",  # 512 x 512, JPEG 2000 lossless
    "eCT_Supplemental.dcm",  # Enhanced CT, 2 frames 512 x 512
    "J2K_pixelrep_mismatch.dcm",  # head, 512 x 512, JPEG 2000 lossless
    "explicit_VR-UN.dcm",  # pancreas, 512 x 512, JPEG 2000 lossless
    "bad_sequence.dcm",  # neck, 512 x 512, JPEG Lossless SV1
)


@dataclass(frozen=True)
class RealSlices:
    """One real CT file as a volume in HU."""

    name: str
    volume: Volume
    transfer_syntax: str
    sha256: str  # of the HU array, to show the set is fixed


def load_real_ct(names: tuple[str, ...] = REAL_CT_FILES) -> list[RealSlices]:
    """Decode the named test files (skipping any that are missing or not decodable)."""
    import pydicom
    from pydicom.data import get_testdata_file

    from node.volume import assemble

    out: list[RealSlices] = []
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = get_testdata_file(name)
            if path is None:
                log.warning("real CT test file %s not available", name)
                continue
            try:
                ds = pydicom.dcmread(path)
                av = assemble([ds], intensity=Intensity.HU)
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                log.warning("cannot use %s: %s", name, exc)
                continue
        data = np.ascontiguousarray(av.volume.data, dtype=np.float32)
        digest = hashlib.sha256(data.tobytes()).hexdigest()
        out.append(RealSlices(name, Volume(data, av.volume.spacing, Intensity.HU),
                              str(ds.file_meta.TransferSyntaxUID.name), digest))
    return out


def real_ct_cases(dose: float, seed: int = 0,
                  names: tuple[str, ...] = REAL_CT_FILES) -> list:
    """:class:`engine.evaluate.Case` list: real slices with simulated dose fraction ``dose``."""
    from engine.degrade import low_dose_ct
    from engine.evaluate import Case

    if not 0 < dose < 1:
        raise ValueError("dose must be in (0, 1) for a real scan (its own dose counts as 1)")
    added = dose / (1.0 - dose)
    cases = []
    for i, rs in enumerate(load_real_ct(names)):
        v = rs.volume
        ref = np.clip(v.data, -1024.0, 3071.0).astype(np.float32)  # padding (-2000, -3024) -> air
        ld = low_dose_ct(ref, v.spacing[1], added, seed=seed * 1000 + i)
        cases.append(Case(f"real-{rs.name}", Volume(ld, v.spacing, Intensity.HU),
                          Volume(ref, v.spacing, Intensity.HU), None, None,
                          {"file": rs.name, "transfer_syntax": rs.transfer_syntax,
                           "dose": dose, "added_noise_dose": added, "hu_sha256": rs.sha256}))
    return cases
