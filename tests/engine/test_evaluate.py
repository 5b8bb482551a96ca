"""Evaluation report (engine.research.evaluate) for identity, NLM and a tiny seeded model."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from engine.api import Volume
from engine.research.baselines import HuLut, NLMDenoiser
from engine.research.evaluate import (
    model_method,
    phantom_cases,
    run_section,
    score,
    write_report,
)
from engine.research.metrics import CT_RANGE, psnr
from engine.research.phantoms import SPLIT_BASE
from tests.support.engine import tiny_model_dir as make_tiny_model_dir



@pytest.fixture()
def tiny_model_dir(tmp_path):
    return make_tiny_model_dir(tmp_path, "ct_denoise", name="tiny", manifest=False)


def test_cases_come_from_the_test_split():
    cases = phantom_cases("ct_denoise", 2, size=64, n_slices=2, dose=0.25)
    assert [c.info["seed"] for c in cases] == [SPLIT_BASE["test"], SPLIT_BASE["test"] + 1]
    assert cases[0].input.data.shape == (2, 64, 64)
    assert not np.array_equal(cases[0].input.data, cases[0].reference.data)
    mr = phantom_cases("ct_to_mr", 1, size=64, n_slices=1, target="t2w")[0]
    assert mr.input.intensity.value == "HU" and mr.reference.intensity.value == "MR_T2W"


def test_case_cache_round_trip(tmp_path):
    a = phantom_cases("ct_denoise", 1, size=48, n_slices=2, dose=0.5, kind="abdomen",
                      cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    b = phantom_cases("ct_denoise", 1, size=48, n_slices=2, dose=0.5, kind="abdomen",
                      cache_dir=tmp_path)
    np.testing.assert_array_equal(a[0].input.data, b[0].input.data)
    np.testing.assert_array_equal(a[0].lesion_mask, b[0].lesion_mask)
    assert a[0].info == b[0].info and a[0].input.spacing == b[0].input.spacing
    assert b[0].reference.intensity == a[0].reference.intensity


def test_score_identity_and_known_answer():
    case = phantom_cases("ct_denoise", 1, size=64, n_slices=1)[0]
    perfect = score(case, case.reference)
    assert perfect["psnr"] == math.inf and perfect["ssim"] == pytest.approx(1.0)
    assert perfect["mae_hu"] == 0.0 and perfect["noise_sd"] == 0.0
    assert perfect["lesion_contrast_ratio"] == pytest.approx(1.0)
    shifted = Volume(case.reference.data + 10.0, case.reference.spacing, case.reference.intensity)
    assert score(case, shifted)["mae_hu"] == pytest.approx(10.0, abs=0.01)
    with pytest.raises(ValueError):
        score(case, Volume(case.reference.data[:, :32], case.reference.spacing,
                           case.reference.intensity))


def test_ct_to_mr_lesion_dice_is_split_by_ct_visibility():
    from engine.api import Intensity
    from engine.research.evaluate import Case

    yy, xx = np.mgrid[:64, :64]
    a = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 16)  # two lesions of 9 px diameter, 1 mm pixels
    b = ((yy - 44) ** 2 + (xx - 44) ** 2 <= 16)
    les = np.zeros((1, 64, 64), np.int16)
    les[0][a], les[0][b] = 1, 2
    ct = np.full((1, 64, 64), 40.0, np.float32)
    ct[0][a] = 90.0  # lesion 1: +50 HU in the CT; lesion 2: 45 HU, under the 10 HU line
    ct[0][b] = 45.0
    mr = np.full((1, 64, 64), 500.0, np.float32)
    mr[0][a | b] = 900.0  # both bright in the MR reference
    case = Case("two", Volume(ct, (2.0, 1.0, 1.0), Intensity.HU), Volume(mr, (2.0, 1.0, 1.0), Intensity.MR_T2W),
                lesion_mask=les)
    out = mr.copy()
    out[0][b] = 500.0  # the model draws only the CT-visible lesion
    r = score(case, Volume(out, (2.0, 1.0, 1.0), Intensity.MR_T2W))
    assert r["lesion_dice_ge5mm_ct_visible"] > 0.95 and r["lesion_dice_ge5mm_ct_occult"] == 0.0
    assert r["lesion_n_ge5mm_ct_visible"] == 1 and r["lesion_n_ge5mm_ct_occult"] == 1
    assert math.isclose(r["lesion_dice_ge5mm"], 0.5 * r["lesion_dice_ge5mm_ct_visible"], rel_tol=1e-6)
    ct_case = Case("ct", Volume(ct, (2.0, 1.0, 1.0), Intensity.HU), Volume(ct, (2.0, 1.0, 1.0), Intensity.HU),
                   lesion_mask=les)
    assert "lesion_dice_ge5mm_ct_visible" not in score(ct_case, ct_case.reference)  # CT restoration: no split


def test_restoration_lesions_are_read_relative_to_the_received_image():
    """A lesion is kept when the output keeps >= 90 % of its contrast in the input; only
    lesions of >= 10 HU reference contrast count for CT; CT->MR has no such reading."""
    from engine.api import Intensity
    from engine.research.evaluate import Case

    yy, xx = np.mgrid[:64, :64]
    a = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 16)
    b = ((yy - 44) ** 2 + (xx - 44) ** 2 <= 16)
    les = np.zeros((1, 64, 64), np.int16)
    les[0][a], les[0][b] = 1, 2
    ref = np.full((1, 64, 64), 40.0, np.float32)
    ref[0][a], ref[0][b] = 90.0, 45.0  # +50 HU and +5 HU (under the 10 HU line)
    inp = ref.copy()
    inp[0][a] = 80.0  # the received image shows +40 HU of lesion 1
    sp = (2.0, 1.0, 1.0)
    case = Case("ct", Volume(inp, sp, Intensity.HU), Volume(ref, sp, Intensity.HU), lesion_mask=les)
    out = ref.copy()
    out[0][a] = 76.0  # keeps 36 of the input's 40 HU (90 %), 72 % of the reference's 50
    r = score(case, Volume(out, sp, Intensity.HU))
    assert r["lesion_kept_vs_input"] == 1.0 and r["lesion_n_kept_eval"] == 1
    assert r["lesion_contrast_ratio_to_input"] == pytest.approx(0.9, abs=0.01)
    assert r["lesion_contrast_ratio_visible"] == pytest.approx(0.72, abs=0.01)
    out[0][a] = 70.0  # 30 of 40: faded
    assert score(case, Volume(out, sp, Intensity.HU))["lesion_kept_vs_input"] == 0.0


def test_report_for_identity_nlm_and_tiny_model(tmp_path, tiny_model_dir):
    cases = phantom_cases("ct_denoise", 2, size=64, n_slices=3, dose=0.1)
    tiny, desc = model_method(tiny_model_dir, "ct_denoise", params={"steps": 1}, seed=0)
    assert desc["model_id"] and len(desc["weights_sha256"]) == 64
    sec = run_section("CT denoise tiny", "ct_denoise", cases,
                      {"NLM": NLMDenoiser(1.2), "tiny model": tiny}, tmp_path, n_pictures=1)
    assert set(sec.per_case) == {"input (no processing)", "NLM", "tiny model"}
    ident = sec.mean("input (no processing)")
    want = np.mean([psnr(c.reference.data, c.input.data, CT_RANGE) for c in cases])
    assert ident["psnr"] == pytest.approx(want)
    report = write_report([sec], tmp_path, "test report")
    text = report.read_text()
    assert "| NLM |" in text and "| tiny model |" in text and "PSNR dB" in text
    assert sec.pictures and (tmp_path / sec.pictures[0]).exists()
    img = Image.open(tmp_path / sec.pictures[0])
    assert img.size[0] == 4 * 256 and img.size[1] > 2 * 256  # two method rows
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert len(data[0]["per_case"]["NLM"]) == 2


def test_ct_to_mr_section_with_lut(tmp_path):
    train = [(c.input.data, c.reference.data)
             for c in phantom_cases("ct_to_mr", 2, size=64, n_slices=1, split="train")]
    lut = HuLut.fit(train, "MR_T1W")
    cases = phantom_cases("ct_to_mr", 1, size=64, n_slices=1)
    sec = run_section("CT to T1w", "ct_to_mr", cases, {"HU lookup": lut}, tmp_path)
    m = sec.mean("HU lookup")
    assert "input (no processing)" not in sec.per_case
    assert 0.0 < m["ssim"] < 1.0 and "ssim_body" in m and "lesion_dice_ge5mm" in m


def test_real_ct_slices_decode_and_degrade():
    """node.evaluation.realdata: pydicom(-data) CT files incl. JPEG 2000 / JPEG Lossless, in HU."""
    from engine.research.metrics import flat_mask_from_reference, noise_sd
    from node.evaluation.realdata import load_real_ct, real_ct_cases

    real = load_real_ct()
    names = {r.name for r in real}
    assert {"CT_small.dcm", "693_J2KR.dcm"} <= names and len(real) >= 5
    assert any("JPEG 2000" in r.transfer_syntax for r in real)
    assert len({r.sha256 for r in real}) == len(real)  # distinct images
    for r in real:
        d = r.volume.data
        # a CT slice in HU: air or lung and soft tissue both present
        assert (d < -700).mean() > 0.02 and ((d > -100) & (d < 100)).mean() > 0.05, r.name
    small = ("CT_small.dcm",)
    sd = []
    for dose in (0.5, 0.1):
        (case,) = real_ct_cases(dose, names=small)
        flat = flat_mask_from_reference(case.reference.data)
        sd.append(noise_sd(case.reference.data, case.input.data, flat))
    assert 0 < sd[0] < sd[1]
    with pytest.raises(ValueError):
        real_ct_cases(1.0, names=small)
    # as received (augmentation): input = reference = the scan, padding clipped to air
    from node.evaluation.realdata import real_ct_originals

    (orig,) = real_ct_originals(small)
    assert orig.input.data is orig.reference.data and orig.input.data.min() >= -1024.0
    np.testing.assert_array_equal(orig.reference.data, case.reference.data)


def test_real_mr_images_decode_crop_and_get_rician_noise():
    """node.evaluation.realdata: pydicom(-data) MR files incl. JPEG 2000, centre-cropped to the engine's grid."""
    from engine.research.degrade import foreground_mask
    from node.evaluation.realdata import REAL_MR_FILES, real_mr_cases

    cases = real_mr_cases(20.0)
    assert {c.info["file"] for c in cases} == set(REAL_MR_FILES)
    assert any("JPEG 2000" in c.info["transfer_syntax"] for c in cases)
    for c in cases:
        assert c.input.data.shape == c.reference.data.shape
        assert all(n % 16 == 0 for n in c.input.data.shape[1:]), c.name
        assert c.reference.intensity.value == "MR" and c.reference.data.min() >= 0
    siemens = next(c for c in cases if c.info["file"].startswith("MR-SIEMENS"))
    assert siemens.input.data.shape[1:] == (480, 480)  # 484 px, 2 px cut on each side
    small = ("MR_small.dcm",)
    sd = []
    for snr in (20.0, 5.0):
        (c,) = real_mr_cases(snr, names=small)
        fg = foreground_mask(c.reference.data)
        sd.append(float((c.input.data - c.reference.data)[fg].std()))
        ratio = float(c.reference.data[fg].mean()) / sd[-1]
        assert 0.6 * snr < ratio < 1.4 * snr, (snr, ratio)  # Rician noise at the asked SNR
    assert sd[0] < sd[1]


def test_cli_evaluate_writes_a_report(tmp_path):
    from typer.testing import CliRunner

    from node.cli import app

    res = CliRunner().invoke(app, ["engine", "evaluate", "mr_denoise", "--n", "1", "--size", "64",
                                   "--slices", "1", "--snr", "10", "--no-real", "--out", str(tmp_path),
                                   "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "mr_denoise" / "report.md").read_text()
    assert "MR restoration, phantoms, SNR 10" in text and "| NLM (h=0.6 sigma) |" in text
    bad = CliRunner().invoke(app, ["engine", "evaluate", "nonsense", "--out", str(tmp_path)])
    assert bad.exit_code != 0


def test_method_labels_are_unique():
    from node.evaluation.realdata import method_labels

    d = [{"model_id": "ct-denoise-wreg", "version": v, "objective": "regression"} for v in ("1.4.0", "1.3.0")]
    other = {"model_id": "ct-denoise-wdiff", "version": "2.1.0", "objective": "diffusion"}
    assert method_labels([d[0], other]) == ["ct-denoise-wreg (regression)", "ct-denoise-wdiff (diffusion)"]
    assert method_labels([d[0], d[1], other]) == ["ct-denoise-wreg 1.4.0 (regression)",
                                                  "ct-denoise-wreg 1.3.0 (regression)",
                                                  "ct-denoise-wdiff (diffusion)"]
    assert method_labels([d[0], d[0]]) == ["ct-denoise-wreg 1.4.0 (regression) #1",
                                           "ct-denoise-wreg 1.4.0 (regression) #2"]


def test_cli_evaluate_keeps_a_row_per_model_when_ids_repeat(tmp_path, tiny_model_dir):
    """A model beside its previous version (same model id): two rows, not one overwriting the other."""
    from typer.testing import CliRunner

    from node.cli import app

    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["version"] = "0.9.0"
    (old / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["engine", "evaluate", "ct_denoise", "--n", "1", "--size", "64",
                                   "--slices", "1", "--no-real", "--model", str(tiny_model_dir),
                                   "--model", str(old), "--out", str(tmp_path / "rep"),
                                   "--param", "steps=1"])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "rep" / "ct_denoise" / "report.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ct-denoise-wdiff ")]
    assert [r.split(" |")[0] for r in rows] == ["| ct-denoise-wdiff 1.0.0 (diffusion)",
                                                "| ct-denoise-wdiff 0.9.0 (diffusion)"]


# --------------------------------------------------------------------------- augmentation
def _aug_case():
    return phantom_cases("augment", 1, size=128, n_slices=2)[0]


def test_augment_cases_are_normal_dose_ct_with_the_clean_reference():
    case = _aug_case()
    assert case.info["dose"] == 1.0 and case.input.intensity.value == "HU"
    low = phantom_cases("ct_denoise", 1, size=128, n_slices=2, dose=0.25)[0]
    body = case.labels > 0
    nd = float((case.input.data - case.reference.data)[body].std())
    ld = float((low.input.data - low.reference.data)[body].std())
    assert 0.0 < 1.5 * nd < ld  # a normal-dose scan: noisy, but less than a quarter-dose one


def test_score_variants_known_answers():
    from engine.research.evaluate import score_variants

    case = _aug_case()
    same = score_variants(case, [case.input, case.input])
    assert same["mae_to_input"] == 0.0 and same["ssim_to_input"] == pytest.approx(1.0)
    assert same["ssim_to_input_liver"] == pytest.approx(1.0) or math.isnan(same["ssim_to_input_liver"])
    assert same["body_dice"] == 1.0 and same["bone_dice"] == 1.0
    assert same["texture_ratio"] == pytest.approx(1.0) and same["variant_sd"] == 0.0
    assert math.isnan(score_variants(case, [case.input])["variant_sd"])
    # pixel noise varies a lot per pixel but little after smoothing; an offset blob is structural
    rng = np.random.default_rng(0)
    noisy = [Volume(case.input.data + rng.normal(0, 40, case.input.data.shape).astype(np.float32),
                    case.input.spacing, case.input.intensity) for _ in range(4)]
    sn = score_variants(case, noisy)
    assert sn["variant_sd"] > 30.0 and sn["structural_sd"] < 0.3 * sn["variant_sd"]
    assert sn["texture_ratio"] > 1.3 and sn["body_dice"] > 0.99
    # smoothing every variant: texture ratio < 1; blanking the body: anatomy gone
    smooth = Volume(np.stack([ndimage.gaussian_filter(s, 2.0) for s in case.input.data]),
                    case.input.spacing, case.input.intensity)
    sm = score_variants(case, [smooth])
    assert sm["texture_ratio"] < 0.7
    head = phantom_cases("augment", 2, size=128, n_slices=1)[1]  # the head phantom: brain ROI
    flat = Volume(np.where(np.isin(head.labels, (10, 11, 12)), 35.0, head.input.data).astype(np.float32),
                  head.input.spacing, head.input.intensity)  # ventricles and grey / white matter erased
    er = score_variants(head, [flat])
    assert er["ssim_to_input_brain"] < 0.9 < er["body_dice"] and er["ssim_to_input"] > er["ssim_to_input_brain"]
    air = Volume(np.full_like(case.input.data, -1000.0), case.input.spacing, case.input.intensity)
    gone = score_variants(case, [air])
    assert gone["body_dice"] == 0.0 and gone["mae_to_input"] > 100.0
    with pytest.raises(ValueError):
        score_variants(case, [])


def test_score_variants_counts_added_lesions():
    from engine.research.evaluate import score_variants

    case = phantom_cases("augment", 4, size=128, n_slices=1, kind="abdomen")[0]
    assert case.lesion_mask is not None and case.lesion_mask.any()
    base = score_variants(case, [case.input])
    assert base["false_lesions_per_slice"] == 0.0 and base["lesion_dice_ge5mm"] > 0.7
    # paint a 12 mm dark disc into the liver, away from the true lesions
    liver = (case.labels[0] == 4) & ~ndimage.binary_dilation(case.lesion_mask[0] > 0, iterations=12)
    dist = ndimage.distance_transform_edt(liver)
    cy, cx = np.unravel_index(np.argmax(dist), dist.shape)
    yy, xx = np.mgrid[:128, :128]
    r_px = 6.0 / case.input.spacing[1]
    painted = case.input.data.copy()
    painted[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r_px ** 2] -= 60.0
    got = score_variants(case, [Volume(painted, case.input.spacing, case.input.intensity)])
    assert got["false_lesions_per_slice"] == 1.0


def test_dose_resimulation_and_augment_section(tmp_path):
    from engine.research.evaluate import dose_resimulation, run_augment_section

    case = _aug_case()
    fn = dose_resimulation(3, 0.5, seed=1)
    vs = fn(case.input)
    assert len(vs) == 3 and all(v.data.shape == case.input.data.shape for v in vs)
    assert not np.array_equal(vs[0].data, vs[1].data)
    np.testing.assert_array_equal(dose_resimulation(3, 0.5, seed=1)(case.input)[2].data, vs[2].data)
    with pytest.raises(ValueError):
        dose_resimulation(2, 1.0)
    sec = run_augment_section("CT augmentation tiny", [case], {"resim": fn}, tmp_path, n_pictures=1)
    assert list(sec.per_case) == ["input (no augmentation)", "resim"]
    m = sec.mean("resim")
    assert 0.0 < m["mae_to_input"] < 20.0 and m["body_dice"] > 0.99 and m["structural_sd"] < m["variant_sd"]
    img = Image.open(tmp_path / sec.pictures[0])
    assert img.size[0] == 5 * 256
    text = write_report([sec], tmp_path, "aug").read_text()
    assert "| resim |" in text and "SD across variants HU" in text and "texture ratio" in text


def test_cli_evaluate_augment(tmp_path):
    from typer.testing import CliRunner

    from node.cli import app

    shipped = Path(__file__).resolve().parents[2] / "engine" / "weights" / "ct-augment-wdiff"
    res = CliRunner().invoke(app, ["engine", "evaluate", "augment", "--n", "1", "--size", "64",
                                   "--slices", "1", "--no-real", "--param", "n=2",
                                   "--model", str(shipped),
                                   "--out", str(tmp_path), "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "augment" / "report.md").read_text()
    assert "CT augmentation, phantoms" in text and "| ct-augment-wdiff (diffusion) |" in text
    assert "dose re-simulation (half dose, 2 draws)" in text


def test_picture_outlines_true_lesions_green_and_false_lesions_red(tmp_path):
    from engine.research.evaluate import FALSE_LESION_RGB, LESION_RGB, picture

    case = phantom_cases("augment", 4, size=128, n_slices=1, kind="abdomen")[0]
    liver = (case.labels[0] == 4) & ~ndimage.binary_dilation(case.lesion_mask[0] > 0, iterations=12)
    cy, cx = np.unravel_index(np.argmax(ndimage.distance_transform_edt(liver)), liver.shape)
    yy, xx = np.mgrid[:128, :128]
    painted = case.reference.data.copy()
    painted[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= (6.0 / case.input.spacing[1]) ** 2] -= 60.0
    outs = {"painted": Volume(painted, case.input.spacing, case.input.intensity), "same": case.reference}
    img = np.asarray(Image.open(picture(case, outs, tmp_path / "p.png", tile=128)).convert("RGB"))
    head = 18

    def has(rgb, row, col):
        y0 = head + row * (128 + head) + head
        t = img[y0:y0 + 128, col * 128:(col + 1) * 128]
        return bool((t == rgb).all(axis=-1).any())

    assert has(LESION_RGB, 0, 2) and has(LESION_RGB, 1, 2)             # reference tiles
    assert has(FALSE_LESION_RGB, 0, 1) and not has(FALSE_LESION_RGB, 1, 1)  # only the painted output


def test_lesion_picture_zooms_each_visible_lesion(tmp_path):
    """One row per CT-visible lesion, columns input | methods | reference, windowed around the
    lesion: an output that erased the lesion shows a flat tile where the reference is dark."""
    from engine.research.evaluate import lesion_picture

    case = phantom_cases("augment", 4, size=128, n_slices=1, kind="abdomen")[0]
    les = case.lesion_mask > 0
    erased = case.reference.data.copy()
    grown = ndimage.binary_dilation(les[0], iterations=3)
    erased[0][grown] = float(np.median(case.reference.data[0][ndimage.binary_dilation(grown, iterations=4) & ~grown]))
    outs = {"same": case.reference, "erased": Volume(erased, case.input.spacing, case.input.intensity)}
    p = lesion_picture(case, outs, tmp_path / "l.png", tile=96)
    assert p is not None
    img = np.asarray(Image.open(p).convert("L")).astype(float)
    n_rows = (img.shape[0] - 30) // (96 + 16)
    assert img.shape[1] == 4 * 96 and n_rows >= 1
    # centre of the first (smallest) lesion's tiles: 'same' (col 1) dark like the reference (col 3),
    # 'erased' (col 2) at the background grey
    cy = 30 + 48
    same, gone, ref = (img[cy - 3:cy + 3, c * 96 + 45:c * 96 + 51].mean() for c in (1, 2, 3))
    assert abs(same - ref) < 10 and gone - same > 40, (same, gone, ref)
    no_les = dataclasses.replace(case, lesion_mask=np.zeros_like(case.lesion_mask))
    assert lesion_picture(no_les, outs, tmp_path / "none.png") is None


def test_cli_evaluate_an_adapter_on_phantoms_and_real_mr(tmp_path):
    """`synthnode engine evaluate mr_undersampled --model ADAPTER`: the shipped adapter (its
    base found beside it) and the TV baseline on test-split phantoms and on the real MR images
    of pydicom(-data), each zero-filled from 4x / 8x Cartesian undersampling."""
    from typer.testing import CliRunner

    from node.cli import app
    from node.evaluation.realdata import REAL_MR_FILES, real_recon_cases

    cases = real_recon_cases("mr_undersampled")
    assert {c.info["file"] for c in cases} == set(REAL_MR_FILES)
    assert [c.info["degradation"] for c in cases] == ["4x", "8x", "4x"][:len(cases)]
    for c in cases:
        assert c.input.data.shape == c.reference.data.shape
        assert all(n % 16 == 0 for n in c.input.data.shape[1:]), c.name
        assert not np.allclose(c.input.data, c.reference.data)  # k-space lines removed
    adapter = Path(__file__).resolve().parents[2] / "engine/weights/adapters/mr-undersampled-cnet"
    res = CliRunner().invoke(app, ["engine", "evaluate", "mr_undersampled", "--model",
                                   str(adapter), "--n", "1", "--size", "64", "--out",
                                   str(tmp_path)])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "mr_undersampled" / "report.md").read_text()
    assert "## mr_undersampled, phantoms" in text and "## mr_undersampled, real images" in text
    assert "| mr-undersampled-cnet (diffusion) |" in text and "| TV (weight" in text
