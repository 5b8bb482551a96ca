"""Real CT slices (and MR images) for validating the engine: test files shipped in pydicom /
pydicom-data.

The engine never reads DICOM, so this module (node side) decodes the files with pydicom
(+ pylibjpeg / openjpeg for JPEG 2000 and JPEG Lossless), converts them to HU through the
node's own ingest path (:func:`node.dicom.volume.assemble`: Rescale Slope / Intercept, or the
Pixel Value Transformation functional group for enhanced CT), and hands
:class:`engine.research.evaluate.Case` objects with a simulated low dose to the evaluation.

Low dose on a real scan: the scan already carries its own quantum noise. Treating it as full
dose, a dose fraction ``d`` needs extra noise of variance ``(1/d - 1)`` times the full-dose
variance; :func:`engine.research.degrade.low_dose_ct` adds noise of variance ``1/d'`` times that for
dose ``d'``, so it is called with ``d' = d / (1 - d)`` (Yu et al., Med Phys 39:5035, 2012,
eq. 8 in the same spirit). The reference is the original slice, noise included, so PSNR /
SSIM against it are bounded by the scan's own noise.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.api import Intensity, TaskName, Volume

if TYPE_CHECKING:
    from engine.research.evaluate import Method, Section, VariantsMethod

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


# pydicom / pydicom-data MR files, each a distinct image (the other MR_small_* / emri_small_*
# files hold the same pixels in other transfer syntaxes; MR2_UNCR / MR2_J2KI the same as MR2_J2KR;
# emri_small's frames carry no position / orientation / spacing, which the node's assembly refuses)
REAL_MR_FILES = (
    "MR_small.dcm",  # 64 x 64, Explicit VR Little Endian
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # 484 x 484 (centre-cropped to 480)
    "MR2_J2KR.dcm",  # 1024 x 1024, JPEG 2000 lossless
)


@dataclass(frozen=True)
class RealSlices:
    """One real test file as a volume (CT in HU, or MR in the scanner's units)."""

    name: str
    volume: Volume
    transfer_syntax: str
    sha256: str  # of the pixel array (HU for CT), to show the set is fixed


def load_real_ct(names: tuple[str, ...] = REAL_CT_FILES,
                 intensity: Intensity = Intensity.HU) -> list[RealSlices]:
    """Decode the named test files (skipping any that are missing or not decodable); CT by
    default, MR files with ``intensity=Intensity.MR`` (:func:`real_mr_cases`)."""
    import pydicom
    from pydicom.data import get_testdata_file

    from node.dicom.volume import assemble

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
                av = assemble([ds], intensity=intensity)
            except Exception as exc:
                log.warning("cannot use %s: %s", name, exc)
                continue
        data = np.ascontiguousarray(av.volume.data, dtype=np.float32)
        digest = hashlib.sha256(data.tobytes()).hexdigest()
        out.append(RealSlices(name, Volume(data, av.volume.spacing, intensity),
                              str(ds.file_meta.TransferSyntaxUID.name), digest))
    return out


def _scan_hu(v: Volume) -> np.ndarray:
    """A real scan's HU, padding values (-2000, -3024) clipped to air (-1024)."""
    return np.clip(v.data, -1024.0, 3071.0).astype(np.float32)


def real_ct_cases(dose: float, seed: int = 0,
                  names: tuple[str, ...] = REAL_CT_FILES) -> list:
    """:class:`engine.research.evaluate.Case` list: real slices with simulated dose fraction
    ``dose``."""
    from engine.research.degrade import low_dose_ct
    from engine.research.evaluate import Case

    if not 0 < dose < 1:
        raise ValueError("dose must be in (0, 1) for a real scan (its own dose counts as 1)")
    added = dose / (1.0 - dose)
    cases = []
    for i, rs in enumerate(load_real_ct(names)):
        v = rs.volume
        ref = _scan_hu(v)
        ld = low_dose_ct(ref, v.spacing[1], added, seed=seed * 1000 + i)
        cases.append(Case(f"real-{rs.name}", Volume(ld, v.spacing, Intensity.HU),
                          Volume(ref, v.spacing, Intensity.HU), None, None,
                          {"file": rs.name, "transfer_syntax": rs.transfer_syntax,
                           "dose": dose, "added_noise_dose": added, "hu_sha256": rs.sha256}))
    return cases


def real_ct_originals(names: tuple[str, ...] = REAL_CT_FILES) -> list:
    """:class:`engine.research.evaluate.Case` list: the real CT slices as received (input =
    reference =
    the scan; for augmentation, which works on what a modality sends)."""
    from engine.research.evaluate import Case

    cases = []
    for rs in load_real_ct(names):
        v = rs.volume
        vol = Volume(_scan_hu(v), v.spacing, Intensity.HU)
        cases.append(
            Case(
                f"real-{rs.name}",
                vol,
                vol,
                None,
                None,
                {"file": rs.name, "transfer_syntax": rs.transfer_syntax, "hu_sha256": rs.sha256},
            )
        )
    return cases


def _mr_grid(v: Volume) -> np.ndarray:
    """A real MR image centre-cropped to a multiple of 16 px (the engine's contract),
    negative values clipped to 0."""
    h, w = v.data.shape[1:]
    y0, x0 = (h - h // 16 * 16) // 2, (w - w // 16 * 16) // 2
    return np.clip(v.data[:, y0:y0 + h // 16 * 16, x0:x0 + w // 16 * 16], 0.0, None
                   ).astype(np.float32)


def real_mr_cases(snr: float, seed: int = 0, names: tuple[str, ...] = REAL_MR_FILES) -> list:
    """:class:`engine.research.evaluate.Case` list: real MR images plus Rician noise at ``snr``.

    The scan's own noise is kept in the reference (as for real CT): the input is the scan plus
    Rician noise of sigma = mean foreground signal / ``snr`` (engine.research.degrade.mr_noise), so
    PSNR /
    SSIM against the reference are bounded by the scan's own noise. Images are centre-cropped
    to a multiple of 16 px (the engine's contract).
    """
    from engine.research.degrade import mr_noise
    from engine.research.evaluate import Case

    cases = []
    for i, rs in enumerate(load_real_ct(names, intensity=Intensity.MR)):
        v = rs.volume
        ref = _mr_grid(v)
        noisy = mr_noise(ref, snr, seed=seed * 1000 + i).astype(np.float32)
        cases.append(Case(f"real-{rs.name}", Volume(noisy, v.spacing, Intensity.MR),
                          Volume(ref, v.spacing, Intensity.MR), None, None,
                          {"file": rs.name, "transfer_syntax": rs.transfer_syntax, "snr": snr,
                           "shape": list(ref.shape), "pixels_sha256": rs.sha256}))
    return cases


#: reconstruction tasks ``synthnode engine evaluate`` runs on phantoms and real images
RECON_TASKS = (TaskName.CT_SPARSE_VIEW, TaskName.MR_UNDERSAMPLED)


def real_recon_cases(task: str, seed: int = 0) -> list:
    """:class:`engine.research.evaluate.Case` list for a reconstruction task on the real
    images, each degraded as the task's training data is (engine.research.adapters):
    ``ct_sparse_view``: the real CT slices plus the streaks of FBP from 60 / 90 of 720 views
    (alternating); ``mr_undersampled``: the real MR images (centre-cropped to a multiple of
    16 px) zero-filled from 4x / 8x Cartesian undersampling (alternating). The reference is
    the scan as received (its own noise included)."""
    from engine.research.degrade import SPARSE_VIEWS, mr_undersample, sparse_view_ct
    from engine.research.evaluate import Case

    cases = []
    if task == TaskName.CT_SPARSE_VIEW:
        for i, rs in enumerate(load_real_ct()):
            v = rs.volume
            ref = _scan_hu(v)
            views = SPARSE_VIEWS[i % len(SPARSE_VIEWS)]
            cases.append(Case(f"real-{rs.name}", Volume(sparse_view_ct(ref, views), v.spacing,
                                                        Intensity.HU),
                              Volume(ref, v.spacing, Intensity.HU), None, None,
                              {"file": rs.name, "transfer_syntax": rs.transfer_syntax,
                               "degradation": f"{views} views", "hu_sha256": rs.sha256}))
        return cases
    if task != TaskName.MR_UNDERSAMPLED:
        raise ValueError(f"no real-image recipe for {task!r}")
    for i, rs in enumerate(load_real_ct(REAL_MR_FILES, intensity=Intensity.MR)):
        v = rs.volume
        ref = _mr_grid(v)
        acc = (4, 8)[i % 2]
        cases.append(Case(f"real-{rs.name}", Volume(mr_undersample(ref, acc, seed=seed * 1000 + i),
                                                    v.spacing, Intensity.MR),
                          Volume(ref, v.spacing, Intensity.MR), None, None,
                          {"file": rs.name, "transfer_syntax": rs.transfer_syntax,
                           "degradation": f"{acc}x", "shape": list(ref.shape),
                           "pixels_sha256": rs.sha256}))
    return cases


def method_labels(descs: list[dict]) -> list[str]:
    """Report labels for the evaluated models: ``model_id (objective)``, with the version where two
    models share an id (a model beside its previous version), and the position where even that
    repeats; every label is unique, so no model's row replaces another's."""
    base = [f"{d['model_id']} ({d['objective']})" for d in descs]
    labels = [f"{d['model_id']} {d['version']} ({d['objective']})" if base.count(b) > 1 else b
              for b, d in zip(base, descs, strict=True)]
    return [f"{lab} #{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def evaluate_task(task: str, out_dir, *, models: list | tuple = (), n: int = 8,
                  size: int | None = None, n_slices: int = 3, doses: tuple[float, ...] = (0.25,),
                  snrs: tuple[float, ...] = (15.0,), targets: tuple[str, ...] = ("t1w", "t2w"),
                  real: bool = True, seed: int = 0, params: dict | None = None,
                  options: object = None, lut_train_n: int = 24, n_pictures: int = 2,
                  cache_dir=None) -> object:
    """Run the evaluation behind ``synthnode engine evaluate TASK`` and write the report.

    Methods: every model folder in ``models`` (through ``engine.api.run_task``) plus the
    classical baseline of the task (NLM for restoration, the HU lookup fitted on ``lut_train_n``
    training-split phantoms for CT->MR), all on the same held-out test-split phantoms (and, for
    ``ct_denoise`` with ``real``, on the real pydicom CT slices). ``cache_dir`` caches the
    simulated cases between runs. Returns the report path.
    """
    from engine.research.evaluate import AUGMENT_CONVENTIONS, EVAL_TASKS, write_report

    if task not in EVAL_TASKS + RECON_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS + RECON_TASKS}, got {task!r}")
    out = Path(out_dir)
    size = size or (512 if task == TaskName.CT_DENOISE else 256)
    loaded, model_lines = _load_models(task, models, params, seed, options)
    ev = _EvalRun(task=task, out=out, n=n, size=size, n_slices=n_slices, seed=seed,
                  cache_dir=cache_dir, n_pictures=n_pictures, loaded=loaded)
    if task == TaskName.CT_DENOISE:
        sections = _ct_denoise_sections(ev, doses, real)
    elif task == TaskName.MR_DENOISE:
        sections = _mr_denoise_sections(ev, snrs, real)
    elif task == TaskName.AUGMENT:
        sections = _augment_sections(ev, int((params or {}).get("n") or 4), real)
    elif task in RECON_TASKS:
        sections = _recon_sections(ev, real)
    else:
        sections = _ct_to_mr_sections(ev, models, targets, lut_train_n, options)
    pre = "Models:\n" + ("\n".join(model_lines) if model_lines else "- (none: baselines only)")
    if task == TaskName.AUGMENT:
        pre += "\n\n" + AUGMENT_CONVENTIONS
    return write_report(sections, out, f"Evaluation: {task}", pre)


#: one evaluated model: (report label, method, description, task parameters)
_Loaded = tuple[str, Callable[..., Any], dict[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class _EvalRun:
    """What the sections of one :func:`evaluate_task` run share."""

    task: str
    out: Path
    n: int
    size: int
    n_slices: int
    seed: int
    cache_dir: Any
    n_pictures: int
    loaded: list[_Loaded]

    @property
    def common(self) -> str:
        """The phantom set, for each section's description."""
        return (
            f"{self.n} test-split phantoms (seeds {2_000_000_000}-{2_000_000_000 + self.n - 1}, "
            f"abdomen and MNI152 head alternating), {self.n_slices} slices of "
            f"{self.size}x{self.size} px each"
        )

    def models(self) -> dict[str, Callable[..., Any]]:
        """The models' methods by report label."""
        return {k: fn for k, fn, _, _ in self.loaded}


def _load_models(task: str, models: list | tuple, params: dict | None, seed: int,
                 options: object) -> tuple[list[_Loaded], list[str]]:
    """Load every model folder as a method of ``task`` (with a copy of ``params``); returns
    them with unique labels, and the report's model lines."""
    from engine.research.evaluate import model_method, model_variants

    runs: list[tuple[Callable[..., Any], dict[str, Any], dict[str, Any]]] = []
    for mdir in models:
        p = dict(params or {})
        fn: Callable[..., Any]
        fn, desc = (model_variants(mdir, p, seed=seed, options=options) if task == TaskName.AUGMENT
                    else model_method(mdir, task, p, seed=seed, options=options))
        runs.append((fn, desc, p))
    labels = method_labels([d for _, d, _ in runs])
    loaded = [(lab, fn, d, p) for lab, (fn, d, p) in zip(labels, runs, strict=True)]
    model_lines = [f"- `{d['model_id']}` {d['version']} ({d['objective']}), weights SHA-256 "
                   f"`{d['weights_sha256']}`, folder `{m}`, params {p or 'model defaults'}"
                   for (_, _, d, p), m in zip(loaded, models, strict=True)]
    return loaded, model_lines


def _ct_denoise_sections(ev: _EvalRun, doses: tuple[float, ...], real: bool) -> list[Section]:
    """Per dose: the phantoms, and with ``real`` the real CT slices (NLM baseline)."""
    from engine.research import baselines
    from engine.research.evaluate import load_cases, phantom_cases, run_section, save_cases

    sections = []
    nlm = baselines.nlm_ct()
    for dose in doses:
        methods: dict[str, Method] = {f"NLM (h={nlm.h_factor} sigma)": nlm, **ev.models()}
        cases = phantom_cases(ev.task, ev.n, size=ev.size, n_slices=ev.n_slices, dose=dose,
                              cache_dir=ev.cache_dir)
        sections.append(run_section(
            f"CT restoration, phantoms, dose {dose:g}", ev.task, cases, methods, ev.out,
            f"{ev.common}; input: projection-domain low dose at {dose:g} of full dose; "
            "reference: the noise-free phantom CT.", ev.n_pictures))
        if real:
            rpath = (Path(ev.cache_dir) / f"real-ct-d{dose:g}-seed{ev.seed}.npz"
                     if ev.cache_dir else None)
            if rpath is not None and rpath.exists():
                rcases = load_cases(rpath)
            else:
                rcases = real_ct_cases(dose, seed=ev.seed)
                if rpath is not None:
                    save_cases(rcases, rpath)
            sections.append(run_section(
                f"CT restoration, real slices, dose {dose:g}", ev.task, rcases, methods, ev.out,
                f"{len(rcases)} real CT images from pydicom / pydicom-data "
                f"({', '.join(c.info['file'] for c in rcases)}); input: the scan plus "
                f"projection-domain noise bringing it to {dose:g} of its dose; reference: "
                "the original scan (its own noise included).", ev.n_pictures))
    return sections


def _mr_denoise_sections(ev: _EvalRun, snrs: tuple[float, ...], real: bool) -> list[Section]:
    """Per SNR: the phantoms (T1w and T2w), and with ``real`` the real MR images (NLM
    baseline)."""
    from engine.research import baselines
    from engine.research.evaluate import phantom_cases, run_section

    sections = []
    nlm = baselines.nlm_mr()
    for snr in snrs:
        methods: dict[str, Method] = {f"NLM (h={nlm.h_factor} sigma)": nlm, **ev.models()}
        cases = phantom_cases(ev.task, ev.n, size=ev.size, n_slices=ev.n_slices, snr=snr,
                              target="both", cache_dir=ev.cache_dir)
        sections.append(run_section(
            f"MR restoration, phantoms, SNR {snr:g}", ev.task, cases, methods, ev.out,
            f"{ev.common}; T1w and T2w alternating; input: Rician noise at SNR {snr:g} (mean "
            "body signal / sigma); reference: the noise- and bias-free MR.", ev.n_pictures))
        if real:
            rcases = real_mr_cases(snr, seed=ev.seed)
            sections.append(
                run_section(
                    f"MR restoration, real images, SNR {snr:g}",
                    ev.task,
                    rcases,
                    methods,
                    ev.out,
                    f"{len(rcases)} real MR images from pydicom / pydicom-data "
                    f"({', '.join(c.info['file'] for c in rcases)}; centre-cropped to a "
                    f"multiple of 16 px); input: the scan plus Rician noise at SNR {snr:g} "
                    "(mean foreground signal / sigma); reference: the original scan (its own "
                    "noise included).",
                    ev.n_pictures,
                )
            )
    return sections


def _recon_sections(ev: _EvalRun, real: bool) -> list[Section]:
    """A reconstruction task (adapters): the test-split phantoms of its training recipe, and
    with ``real`` the real images degraded the same way; baseline: TV on the input, its weight
    chosen on 2 validation phantoms."""
    from engine.research.adapters import cases as recon_cases
    from engine.research.adapters import tv_method, tv_weight_on_val
    from engine.research.evaluate import run_section

    weight = tv_weight_on_val(ev.task, ev.size)
    methods: dict[str, Method] = {f"TV (weight {weight:g}, chosen on val)":
                                  tv_method(ev.task, weight), **ev.models()}
    what = ("FBP from 60 / 90 of 720 parallel views" if ev.task == TaskName.CT_SPARSE_VIEW
            else "zero-filled 4x / 8x Cartesian undersampling")
    cases = recon_cases(ev.task, "test", ev.n, ev.size)
    sections = [run_section(
        f"{ev.task}, phantoms", ev.task, cases, methods, ev.out,
        f"{ev.n} test-split phantoms, 3 slices of {ev.size} px; input: {what}; reference: the "
        "phantom image.", ev.n_pictures)]
    if real:
        rcases = real_recon_cases(ev.task, seed=ev.seed)
        sections.append(run_section(
            f"{ev.task}, real images", ev.task, rcases, methods, ev.out,
            f"{len(rcases)} real images from pydicom / pydicom-data "
            f"({', '.join(c.info['file'] + ' ' + c.info['degradation'] for c in rcases)}); "
            f"input: {what} of the scan; reference: the scan as received.", ev.n_pictures))
    return sections


def _augment_sections(ev: _EvalRun, n_var: int, real: bool) -> list[Section]:
    """The phantoms, and with ``real`` the real CT slices as received (baseline: re-simulating
    half the dose ``n_var`` times)."""
    from engine.research.evaluate import dose_resimulation, phantom_cases, run_augment_section

    methods: dict[str, VariantsMethod] = {
        f"dose re-simulation (half dose, {n_var} draws)": dose_resimulation(
            n_var, 0.5, seed=ev.seed
        ),
        **ev.models(),
    }
    cases = phantom_cases(ev.task, ev.n, size=ev.size, n_slices=ev.n_slices,
                          cache_dir=ev.cache_dir)
    sections = [run_augment_section(
        "CT augmentation, phantoms", cases, methods, ev.out,
        f"{ev.common}; input: normal-dose CT (dose 1.0 simulation); lesion metrics against the "
        "noise-free phantom CT.", ev.n_pictures)]
    if real:
        rcases = real_ct_originals()
        sections.append(
            run_augment_section(
                "CT augmentation, real slices",
                rcases,
                methods,
                ev.out,
                f"{len(rcases)} real CT images from pydicom / pydicom-data "
                f"({', '.join(c.info['file'] for c in rcases)}) as received (no lesion masks).",
                ev.n_pictures,
            )
        )
    return sections


def _ct_to_mr_sections(ev: _EvalRun, models: list | tuple, targets: tuple[str, ...],
                       lut_train_n: int, options: object) -> list[Section]:
    """Per target (T1w, T2w): the phantoms, each model run for that target (baseline: the HU
    lookup fitted on ``lut_train_n`` training-split phantoms)."""
    from engine.research import baselines
    from engine.research.evaluate import model_method, phantom_cases, run_section

    sections = []
    luts = baselines.fit_phantom_luts(lut_train_n, size=ev.size)
    for target in targets:
        methods: dict[str, Method] = {
            f"HU lookup ({lut_train_n} training phantoms)": luts[target]
        }
        for (k, _, _, p), mdir in zip(ev.loaded, models, strict=True):
            fn, _ = model_method(
                mdir, ev.task, {**p, "target": target}, seed=ev.seed, options=options
            )
            methods[k] = fn
        cases = phantom_cases(ev.task, ev.n, size=ev.size, n_slices=ev.n_slices, target=target,
                              cache_dir=ev.cache_dir)
        sections.append(run_section(
            f"CT to {target.upper()}, phantoms", ev.task, cases, methods, ev.out,
            f"{ev.common}; input: normal-dose CT (dose 1.0 simulation); reference: the noise- and "
            f"bias-free {target.upper()} of the same labels.", ev.n_pictures))
    return sections
