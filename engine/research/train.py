"""Training: phantom data, the diffusion / regression objectives, checkpoints, model folders.

``synthnode engine train TASK`` (node/cli/engine.py) calls :func:`train`. One run writes

* ``<out>/<model_id>/model.safetensors`` (EMA weights), ``config.json`` (architecture, task(s),
  input contract, normalisation, sampling defaults, model_id, version, training recipe),
  ``MODEL_CARD.md`` (see :func:`write_model_card`);
* ``<run_dir>/checkpoint.safetensors`` + ``checkpoint.json`` (weights, EMA, AdamW moments,
  RNG states, step; no pickle), ``metrics.jsonl`` (one JSON object per logged step).

Objectives (same UNet, same data, same loss family):

* ``diffusion``: rectified flow (MONAI ``RFlowScheduler`` + ``DiffusionInferer`` concat),
  MSE between the predicted and the true velocity ``x0 - eps`` on Haar sub-bands; the
  condition is dropped (zeroed) with probability ``p_uncond`` (``ct_augment`` recipe) so the
  model is also an unconditional generator for augmentation. Restoration recipes are residual
  (``io.residual_scale``): the target is ``k * (clean - received)``.
* ``regression``: the one-step regressor baseline: MSE between the network output (zero
  target slot, fixed timestep) and the clean sub-bands.

Data (engine.research.phantoms + engine.research.degrade): ``n_train`` phantoms of the ``train``
split, mixed
abdomen / head, ``3`` contiguous slices each at ``size`` px (2.5D context of 1 neighbour per
side). CT pairs: noise-free phantom CT (target) and projection-domain Poisson low dose at a
random dose in {0.1, 0.25, 0.5} plus a normal-dose (1.0) version (CT->MR condition). MR pairs:
noise-free T1w / T2w (no bias field) and Rician noise drawn on the fly (SNR 8-40). Training
uses random crops (``crop`` px, default 128: the UNet is fully convolutional, so a model
trained on crops runs on 512x512) with flips and 90-degree rotations.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.nets import (
    PREDICTIONS,
    build_scheduler,
    build_unet,
    count_parameters,
    in_out_channels,
    regression_predict,
    training_prediction,
)
from engine.tasks import TASKS
from engine.types import TaskName
from engine.wavelet import dwt2, idwt2

if TYPE_CHECKING:
    from monai.networks.schedulers import RFlowScheduler

    from engine.research.phantoms import Split

log = logging.getLogger(__name__)

__all__ = [
    "DATA_VERSION",
    "PRESETS",
    "TrainConfig",
    "average_models",
    "make_batch",
    "model_config",
    "prepare_data",
    "train",
    "write_model_card",
]

DATA_VERSION = 1
CT_SCALE = 1000.0  # HU / 1000
MR_TARGET_SCALE = 1000.0  # engine.research.phantoms.MR_SCALE: MR signal in [0, 1] * 1000
LOW_DOSES = (0.1, 0.25, 0.5)
# CT restoration robustness augmentation (make_batch ``robust``; preset key "robust")
ROBUST_CT = {"p_scale": 0.5, "scale_lo": 0.05, "p_single": 0.2}
# "own" texture of a full-dose image (make_batch ``own_texture``): white Gaussian noise blurred
# by a Gaussian of sigma U(blur_lo, blur_hi) px, scaled to SD U(sd_lo, sd_hi) HU, per slice
OWN_TEXTURE = {"blur_lo": 0.5, "blur_hi": 2.0, "sd_lo": 2.0, "sd_hi": 30.0}
# pixel-sharp shapes pasted into a CT restoration pair (make_batch ``sharp_shapes``): 1-6
# ellipses per crop, semi-axes U(r_lo, r_hi) px, no anti-aliasing, the same in the 3 slices;
# inside, the image is set to air (-1000 HU) with probability p_air, else to U(hu_lo, hu_hi)
SHARP_SHAPES = {
    "n_lo": 1,
    "n_hi": 6,
    "r_lo": 0.7,
    "r_hi": 6.0,
    "p_air": 0.5,
    "hu_lo": -300.0,
    "hu_hi": 1200.0,
}
# MR restoration, the real-scan protocol (make_batch ``own_noise``): the target is an
# "acquired" image: the clean phantom times (1 + a correlated texture of relative SD
# U(0, tex_sd_hi), Gaussian blur U(blur_lo, blur_hi) px) with its own Rician noise at SNR
# U(snr_lo, snr_hi); the input adds Rician noise at the training SNR on top of it
MR_OWN_NOISE = {"snr_lo": 25.0, "snr_hi": 80.0, "tex_sd_hi": 0.05, "blur_lo": 0.5, "blur_hi": 2.0}
TRAIN_ANGLES = (
    180  # views for training-data low dose up to 256 px (I0 is scaled by degrade; see docs)
)


def _own_texture(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Correlated texture (HU) of ``shape`` ``(3, H, W)``: see ``OWN_TEXTURE``."""
    o = OWN_TEXTURE
    sig = o["blur_lo"] + (o["blur_hi"] - o["blur_lo"]) * torch.rand((), generator=gen).item()
    sd = o["sd_lo"] + (o["sd_hi"] - o["sd_lo"]) * torch.rand((), generator=gen).item()
    r = math.ceil(3 * sig)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sig) ** 2)
    k = k / k.sum()
    n = torch.randn((shape[0], 1, shape[1], shape[2]), generator=gen)
    n = torch.nn.functional.conv2d(
        torch.nn.functional.pad(n, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1)
    )
    n = torch.nn.functional.conv2d(
        torch.nn.functional.pad(n, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1)
    )
    n = n[:, 0]
    return n / n.std().clamp_min(1e-8) * sd


def _sharp_shapes(crop: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Mask ``(crop, crop)`` of pixel-sharp ellipses and the HU value inside (``SHARP_SHAPES``)."""
    o = SHARP_SHAPES
    yy, xx = torch.meshgrid(
        torch.arange(crop, dtype=torch.float32),
        torch.arange(crop, dtype=torch.float32),
        indexing="ij",
    )
    mask = torch.zeros((crop, crop), dtype=torch.bool)
    n = int(torch.randint(int(o["n_lo"]), int(o["n_hi"]) + 1, (), generator=gen))
    for _ in range(n):
        cy, cx, a, b, ang = torch.rand(5, generator=gen).tolist()
        cy, cx = cy * crop, cx * crop
        a = o["r_lo"] + (o["r_hi"] - o["r_lo"]) * a
        b = o["r_lo"] + (o["r_hi"] - o["r_lo"]) * b
        c, s_ = math.cos(math.pi * ang), math.sin(math.pi * ang)
        u = (yy - cy) * c + (xx - cx) * s_
        v = -(yy - cy) * s_ + (xx - cx) * c
        mask |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
    air = torch.rand((), generator=gen).item() < o["p_air"]
    val = (
        -1000.0
        if air
        else o["hu_lo"] + (o["hu_hi"] - o["hu_lo"]) * torch.rand((), generator=gen).item()
    )
    return mask, val


def train_angles(size: int) -> int:
    """Views for the training low dose: the evaluation's own choice
    (engine.research.degrade.default_angles), 180 up to 256 px (as data version 1), 360 above, so
    512 px
    training pairs match evaluation."""
    from engine.research.degrade import default_angles

    return TRAIN_ANGLES if size <= 256 else default_angles(size)

# Per "training task": which inference tasks the model serves, I/O, normalisation, sampling.
PRESETS: dict[str, dict[str, Any]] = {
    "ct_denoise": {
        "tasks": [TaskName.CT_DENOISE],
        "io": {
            "target_channels": 1,
            "cond_channels": 1,
            "context_slices": 1,
            "target_names": ["ct"],
            "residual_scale": 50.0,
        },
        "normalisation": {
            "input": {"kind": "hu", "scale": CT_SCALE},
            "output": {"kind": "hu", "scale": CT_SCALE},
        },
        "sampling": {TaskName.CT_DENOISE: {"steps": 2, "strength": 0.3}},
        "p_uncond": 0.0,
        "train_t_max": 0.6,
        "robust": True,
    },
    # augmentation: the same UNet, NOT residual, trained with condition dropout so that it is
    # also an unconditional denoiser of partially noised CT (SDEdit variants)
    "ct_augment": {
        "tasks": [TaskName.AUGMENT],
        "io": {
            "target_channels": 1,
            "cond_channels": 1,
            "context_slices": 1,
            "target_names": ["ct"],
        },
        "normalisation": {
            "input": {"kind": "hu", "scale": CT_SCALE},
            "output": {"kind": "hu", "scale": CT_SCALE},
        },
        "sampling": {TaskName.AUGMENT: {"steps": 4, "strength": 0.35}},
        "p_uncond": 0.15,
        "train_t_max": 0.6,
        "data_task": TaskName.CT_DENOISE,
    },
    "mr_denoise": {
        "tasks": [TaskName.MR_DENOISE],
        "io": {
            "target_channels": 1,
            "cond_channels": 1,
            "context_slices": 1,
            "target_names": ["mr"],
            "residual_scale": 10.0,
        },
        "normalisation": {
            "input": {"kind": "percentile", "q": 0.995},
            "output": {"kind": "percentile", "q": 0.995},
        },
        "sampling": {TaskName.MR_DENOISE: {"steps": 2, "strength": 0.3}},
        "p_uncond": 0.0,
        "train_t_max": 0.6,
    },
    "ct_to_mr": {
        "tasks": [TaskName.CT_TO_MR],
        "io": {
            "target_channels": 2,
            "cond_channels": 1,
            "context_slices": 1,
            "target_names": ["t1w", "t2w"],
        },
        "normalisation": {
            "input": {"kind": "hu", "scale": CT_SCALE},
            "output": {
                "t1w": {"kind": "fixed", "scale": MR_TARGET_SCALE},
                "t2w": {"kind": "fixed", "scale": MR_TARGET_SCALE},
            },
        },
        "sampling": {TaskName.CT_TO_MR: {"steps": 6}},
        "p_uncond": 0.0,
        "train_t_max": 1.0,
    },
}

DEFAULT_ARCH = {
    "kind": "DiffusionModelUNet",
    "spatial_dims": 2,
    "channels": [32, 32, 64, 64],
    "num_res_blocks": 1,
    "attention_levels": [False, False, False, False],
    "norm_num_groups": 8,
    "wavelet": {"kind": "haar", "levels": 1, "orthonormal": True},
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in config.json and the model card)."""

    task: str
    objective: str = "diffusion"
    steps: int = 1500
    batch: int = 8
    crop: int = 128
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    # None = automatic: 0.995, but an EMA window (1 / (1 - d)) of at most 10 % of the run
    ema_decay: float | None = None
    seed: int = 0
    n_train: int = 96
    size: int = 256
    data_seed_split: str = "train"
    architecture: dict[str, Any] = field(
        default_factory=lambda: json.loads(json.dumps(DEFAULT_ARCH))
    )
    model_id: str | None = None
    version: str = "1.0.0"
    log_every: int = 25
    ckpt_every: int = 200
    # wall-clock budget: after 10 steps the step count is lowered (never raised) so that the
    # run, cosine schedule included, fits in max_minutes; the final count is recorded
    max_minutes: float | None = None
    # lesion emphasis (needs ``les`` in the data, prepare_data writes it): the per-pixel MSE
    # weight is 1 + lesion_weight inside lesions grown by 2 px (normalised by the batch's mean
    # weight), and with probability lesion_crop a crop is centred on a random lesion pixel
    lesion_weight: float = 0.0
    lesion_crop: float = 0.0
    # CT restoration, the evaluation's real-scan protocol (LDCT practice: the target is the
    # full-dose scan with its own noise): with this probability a pair is input =
    # nd + sqrt(1 - d) (ld - ct), i.e. a dose-d scan derived from the full-dose one by adding
    # independent projection-domain noise, target = nd (see make_batch)
    fulldose_target: float = 0.0
    # in those pairs, probability that the full-dose image's own noise is a synthetic
    # correlated texture (OWN_TEXTURE) instead of the phantom's own projection-domain noise
    own_texture: float = 0.0
    # CT restoration: probability of pasting pixel-sharp shapes (SHARP_SHAPES) into a pair
    sharp_shapes: float = 0.0
    # MR restoration: probability that a pair's target keeps its own noise and texture
    # (MR_OWN_NOISE; input = target + Rician noise), the real-scan protocol
    own_noise: float = 0.0
    # initialise the network (and EMA) from this model folder's weights (fine-tuning)
    init_from: str | None = None
    # CT->MR regression: loss = (weighted) MSE + ssim_weight * (1 - SSIM) of the pixel-domain
    # prediction (MONAI SSIMLoss, Gaussian window sigma 1.5, data range 2 = the target range
    # [-1, 1]), i.e. the structure term the evaluation scores, beside the PSNR term
    ssim_weight: float = 0.0
    # diffusion: what the network predicts, "velocity" (x0 - eps) or "x0" (the clean sample;
    # loss = (weighted) MSE to x0, so the lesion weight and the SSIM term apply as for the
    # regressor, and a regressor's weights are a warm start: its output at t = T is x0)
    prediction: str = "velocity"
    # training times t ~ U(0, train_t_max T); None = the task preset's (0.6 for restoration,
    # whose flow starts at strength <= 0.6; 1.0 to sample restoration from pure noise)
    train_t_max: float | None = None
    # diffusion: probability of dropping (zeroing) the condition in a training sample; None =
    # the task preset's (0.15 for ct_augment, whose sampling always drops it; 0 otherwise)
    p_uncond: float | None = None
    # sampling defaults written to the model config, over the preset's (e.g. {"steps": 4,
    # "strength": 1.0, "threshold_percentile": 0.0}); validated against the task contract
    sampling: dict[str, Any] | None = None

    def resolved_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        suffix = "wdiff" if self.objective == "diffusion" else "wreg"
        return f"{self.task.replace('_', '-')}-{suffix}"


def _check_prediction_recipe(tc: TrainConfig) -> None:
    """Refuse a ``prediction`` / ``ssim_weight`` the objective and task do not allow."""
    if tc.prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}")
    if tc.prediction != "velocity" and tc.objective != "diffusion":
        raise ValueError("prediction applies to the diffusion objective")
    if tc.ssim_weight and (
        tc.task != "ct_to_mr" or not (tc.objective == "regression" or tc.prediction == "x0")
    ):
        raise ValueError(
            "ssim_weight applies to ct_to_mr regression or x0-prediction diffusion only"
        )


def _apply_schedule_overrides(tc: TrainConfig, p: dict[str, Any]) -> None:
    """``train_t_max`` and ``p_uncond`` of ``tc`` over the preset ``p`` (checked, in place)."""
    if tc.train_t_max is not None:
        if not 0.0 < tc.train_t_max <= 1.0:
            raise ValueError("train_t_max must be in (0, 1]")
        p["train_t_max"] = float(tc.train_t_max)
    if tc.p_uncond is not None:
        if tc.objective != "diffusion":
            raise ValueError("p_uncond applies to the diffusion objective")
        if not 0.0 <= tc.p_uncond <= 1.0:
            raise ValueError("p_uncond must be in [0, 1]")
        p["p_uncond"] = float(tc.p_uncond)


def _apply_sampling_overrides(tc: TrainConfig, p: dict[str, Any], tasks: list[str]) -> None:
    """``tc.sampling`` over the preset ``p``'s sampling defaults of each of ``tasks``, validated
    against the task contract (in place)."""
    if not tc.sampling:
        return
    if tc.objective != "diffusion":
        raise ValueError("sampling defaults apply to diffusion models")
    for t in tasks:
        spec = TASKS[t]
        unknown = sorted(set(tc.sampling) - set(spec.params))
        if unknown:
            raise ValueError(f"sampling: unknown parameter(s) for {t}: {unknown}")
        vals = {k: spec.params[k].coerce(k, v) for k, v in tc.sampling.items()}
        if "strength" in vals and vals["strength"] > p["train_t_max"] + 1e-9:
            raise ValueError(
                f"sampling strength {vals['strength']} is above train_t_max "
                f"{p['train_t_max']}: the model never saw such noise levels"
            )
        p["sampling"][t] = {**p["sampling"].get(t, {}), **vals}


def model_config(tc: TrainConfig) -> dict[str, Any]:
    """The JSON-able model config written to ``config.json``."""
    if tc.task not in PRESETS:
        raise ValueError(f"no training preset for task {tc.task!r}; known: {sorted(PRESETS)}")
    if tc.objective not in ("diffusion", "regression"):
        raise ValueError("objective must be 'diffusion' or 'regression'")
    p = json.loads(json.dumps(PRESETS[tc.task]))
    tasks = (p["tasks"] if tc.objective == "diffusion"
             else [t for t in p["tasks"] if t != TaskName.AUGMENT])
    _check_prediction_recipe(tc)
    _apply_schedule_overrides(tc, p)
    _apply_sampling_overrides(tc, p, tasks)
    cfg_pred = {"prediction": tc.prediction} if tc.objective == "diffusion" else {}
    return {
        "format": "synthnode-model/1",
        "model_id": tc.resolved_model_id(),
        "version": tc.version,
        "task": tc.task,
        "tasks": tasks,
        "objective": tc.objective,
        "architecture": tc.architecture,
        "io": p["io"],
        "scheduler": {
            "kind": "RFlowScheduler",
            "num_train_timesteps": 1000,
            "sample_method": "uniform",
        },
        "normalisation": p["normalisation"],
        "sampling": {**p["sampling"], "threshold_floor": 1.0},
        "input_contract": {t: TASKS[t].describe() for t in tasks},
        "p_uncond": p["p_uncond"] if tc.objective == "diffusion" else 0.0,
        # training times t ~ U(0, train_t_max * T): restoration and augmentation only ever
        # start at t <= 0.6 T (their `strength` contract), so capacity is spent there
        "train_t_max": p["train_t_max"],
        "data_task": p.get("data_task", tc.task),
        **cfg_pred,
    }


# --------------------------------------------------------------------------- data
def prepare_data(path: Path | str, n: int, size: int = 256, split: Split = "train",
                 start: int = 0, progress: Callable[[int, int], None] | None = None) -> Path:
    """Render ``n`` paired phantoms (3 slices each) and their low-dose CT into ``path`` (npz).

    Arrays: ``ct`` clean HU, ``ld`` low dose, ``nd`` normal dose (dose 1.0), ``t1w``/``t2w``
    noise-free without bias field, each ``(n, 3, size, size)`` float32; ``dose`` (n,);
    ``seeds`` (n,) phantom seeds; ``kinds`` (n,) 0 = abdomen, 1 = head; ``les``
    ``(n, 3, size, size)`` uint8, 1 inside a lesion (for the lesion-weighted loss,
    ``TrainConfig.lesion_weight``).
    """
    from engine.research import phantoms
    from engine.research.degrade import low_dose_ct

    path = Path(path)
    arrs: dict[str, list[np.ndarray]] = {k: [] for k in ("ct", "ld", "nd", "t1w", "t2w")}
    les: list[np.ndarray] = []
    doses, seeds, kinds = [], [], []
    for i, s in enumerate(
        phantoms.iter_dataset(
            split,
            n,
            size=size,
            n_slices=3,
            kind="mixed",
            start=start,
            mr_snr=None,
            bias_strength=0.0,
        )
    ):
        dose = LOW_DOSES[(start + i) % len(LOW_DOSES)]
        res = low_dose_ct(
            s.ct_hu, s.spacing[1], (dose, 1.0), seed=s.seed, n_angles=train_angles(size)
        )
        arrs["ct"].append(s.ct_hu)
        arrs["ld"].append(res[dose])
        arrs["nd"].append(res[1.0])
        arrs["t1w"].append(s.t1w)
        arrs["t2w"].append(s.t2w)
        les.append((s.lesion_mask > 0).astype(np.uint8))
        doses.append(dose)
        seeds.append(s.seed)
        kinds.append(0 if s.kind == "abdomen" else 1)
        if progress:
            progress(i + 1, n)
    tmp = path.with_suffix(".tmp.npz")
    images: dict[str, Any] = {k: np.stack(v).astype(np.float32) for k, v in arrs.items()}
    np.savez(
        tmp,
        **images,
        les=np.stack(les),
        dose=np.array(doses, np.float32),
        seeds=np.array(seeds, np.int64),
        kinds=np.array(kinds, np.int8),
        meta=np.array(
            json.dumps(
                {
                    "data_version": DATA_VERSION,
                    "split": split,
                    "n": n,
                    "size": size,
                    "start": start,
                    "angles": train_angles(size),
                    "doses": LOW_DOSES,
                }
            )
        ),
    )
    os.replace(tmp, path)
    return path


def load_data(path: Path | str) -> dict[str, Any]:
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    d["meta"] = json.loads(str(d["meta"]))
    return d


def _rician(clean: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n1 = torch.randn(clean.shape, generator=gen) * sigma
    n2 = torch.randn(clean.shape, generator=gen) * sigma
    return torch.sqrt((clean + n1) ** 2 + n2 ** 2)


def _augment_geom(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    t = torch.rot90(t, k, dims=(-2, -1))
    return torch.flip(t, dims=(-1,)) if flip else t


def make_batch(task: str, data: dict[str, Any], gen: torch.Generator, batch: int, crop: int,
               robust: bool = False, *, lesion_crop: float = 0.0, fulldose_target: float = 0.0,
               own_texture: float = 0.0, sharp_shapes: float = 0.0, own_noise: float = 0.0,
               with_lesions: bool = False) -> tuple[torch.Tensor, ...]:
    """One training batch in network units (pixel domain, before the DWT).

    Returns ``(target, cond)``: ``(B, Ct, crop, crop)`` and ``(B, 3, crop, crop)`` (the slice
    and its two neighbours).

    ``robust`` (CT restoration, see ``ROBUST_CT``): with probability ``p_scale`` the received
    noise is scaled by ``U(scale_lo, 1)`` (``clean + a (received - clean)``), so the model sees
    noise from almost none up to the lowest dose and must judge the level from the image (a
    model trained only on 10-33 HU flattened real texture in a 2.4 HU scan); with probability
    ``p_single`` both neighbours are replaced by the centre slice, which is what a single-slice
    or edge input looks like to the network (``engine.tasks`` repeats edge slices).

    ``fulldose_target`` (CT restoration): with this probability the pair mirrors the
    real-scan evaluation (node.evaluation.realdata): the target is the normal-dose image ``nd``
    (its own noise included) and the input ``nd + sqrt(1 - d) (ld - ct)``, a scan of dose ``d``
    derived from it (``ld - ct`` is projection-domain noise of variance ``1/d``, drawn
    independently of ``nd``'s, so the added part has variance ``1/d - 1`` as in evaldata's
    ``d / (1 - d)``).
    ``own_texture``: in those pairs, probability that the full-dose image is ``ct + texture``
    (``_own_texture``: a correlated texture unlike the projection-domain noise) instead of
    ``nd``, so that the model learns to remove the simulated low-dose noise and keep a scan's
    own texture.
    ``sharp_shapes`` (CT restoration): with this probability, pixel-sharp ellipses
    (``SHARP_SHAPES``: air pockets or constant-HU objects, no partial volume) are pasted into the
    crop's clean image, target and input alike (the input keeps its noise there), so that the
    model learns to keep edges sharper than the phantoms' smoothed ones (small gas pockets,
    sharp-kernel or segmented images).
    ``own_noise`` (MR restoration): with this probability the target is an "acquired" image
    that keeps its own Rician noise and a correlated texture (``MR_OWN_NOISE``) and the input
    is that image plus Rician noise at the drawn SNR: the real-scan evaluation protocol, so the
    model learns to remove the added noise, not everything that is not a smooth phantom.
    ``lesion_crop``: probability of centring the crop on a random lesion pixel (``data["les"]``).
    ``with_lesions``: also return the centre slice's lesion mask crop ``(B, 1, crop, crop)``.
    With the defaults the random stream is the one of earlier versions (same batches).
    """
    n, _, h, w = data["ct"].shape
    idx = torch.randint(0, n, (batch,), generator=gen).tolist()
    les_all = data.get("les")
    tg, cd, lz = [], [], []
    for i in idx:
        base3: torch.Tensor | None = None  # the clean side of a CT restoration pair
        if task == TaskName.CT_DENOISE:
            target, cond, base3 = _ct_denoise_pair(data, i, gen, robust, fulldose_target,
                                                   own_texture)
        elif task == TaskName.CT_TO_MR:
            target, cond = _ct_to_mr_pair(data, i, gen)
        elif task == TaskName.MR_DENOISE:
            target, cond = _mr_denoise_pair(data, i, gen, own_noise)
        else:
            raise ValueError(f"no training data recipe for task {task!r}")
        les_i = (torch.from_numpy(les_all[i][1:2].astype(np.float32)) if les_all is not None
                 else torch.zeros((1, h, w)))
        y0, x0 = _crop_origin(les_i, h, w, crop, gen, lesion_crop)
        k = int(torch.randint(0, 4, (), generator=gen))
        flip = bool(torch.randint(0, 2, (), generator=gen))
        sl = (slice(None), slice(y0, y0 + crop), slice(x0, x0 + crop))
        tgt_c, cond_c = target[sl], cond[sl]
        if (
            base3 is not None  # CT restoration
            and sharp_shapes > 0
            and torch.rand((), generator=gen).item() < sharp_shapes
        ):
            tgt_c, cond_c = _paste_sharp_shapes(tgt_c, cond_c, base3[sl], crop, gen)
        tg.append(_augment_geom(tgt_c, k, flip))
        cd.append(_augment_geom(cond_c, k, flip))
        lz.append(_augment_geom(les_i[sl], k, flip))
    out = (torch.stack(tg).float().contiguous(), torch.stack(cd).float().contiguous())
    return (*out, torch.stack(lz).float().contiguous()) if with_lesions else out


def _ct_denoise_pair(
    data: dict[str, Any],
    i: int,
    gen: torch.Generator,
    robust: bool,
    fulldose_target: float,
    own_texture: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CT restoration pair of sample ``i`` (see :func:`make_batch`): ``(target, cond, base3)``,
    ``base3`` the clean side of the 3 condition slices (ct, nd, or ct + own texture)."""
    use_nd = torch.rand((), generator=gen).item() < 0.25
    derived = (not use_nd and fulldose_target > 0
               and torch.rand((), generator=gen).item() < fulldose_target)
    if derived:  # the real-scan protocol: target = full dose, input = full dose + extra noise
        d = float(data["dose"][i])
        if own_texture > 0 and torch.rand((), generator=gen).item() < own_texture:
            ct3 = torch.from_numpy(data["ct"][i])
            nd3 = (ct3 + _own_texture(tuple(ct3.shape), gen)) / CT_SCALE
        else:
            nd3 = torch.from_numpy(data["nd"][i]) / CT_SCALE
        extra = math.sqrt(1.0 - d) * (
            torch.from_numpy(data["ld"][i]) - torch.from_numpy(data["ct"][i])
        )
        cond = nd3 + extra / CT_SCALE
        target = nd3[1:2]
        base3 = nd3
    else:
        cond = torch.from_numpy(data["nd" if use_nd else "ld"][i]) / CT_SCALE
        target = torch.from_numpy(data["ct"][i][1:2]) / CT_SCALE
        base3 = torch.from_numpy(data["ct"][i]) / CT_SCALE
    if robust:
        if torch.rand((), generator=gen).item() < ROBUST_CT["p_scale"]:
            lo = ROBUST_CT["scale_lo"]
            a = lo + (1.0 - lo) * torch.rand((), generator=gen).item()
            # scale only the noise the model must remove: the clean side is the
            # target-side image (ct, nd, or ct + own texture), not the phantom's nd
            # (until 2026-12-03 the own-texture pairs used nd here, which also scaled
            # their texture down in the input while the target kept it whole)
            cond = base3 + a * (cond - base3)
        if torch.rand((), generator=gen).item() < ROBUST_CT["p_single"]:
            cond = cond[1:2].expand(3, -1, -1)
            base3 = base3[1:2].expand(3, -1, -1)
    return target, cond, base3


def _ct_to_mr_pair(
    data: dict[str, Any], i: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CT->MR pair of sample ``i``: ``(target, cond)``, the T1w / T2w centre slice in [-1, 1]
    and the normal-dose (or, in 20 % of pairs, low-dose) CT slices."""
    use_ld = torch.rand((), generator=gen).item() < 0.2
    cond = torch.from_numpy(data["ld" if use_ld else "nd"][i]) / CT_SCALE
    t = np.stack([data["t1w"][i][1], data["t2w"][i][1]])
    target = 2.0 * torch.from_numpy(t) / MR_TARGET_SCALE - 1.0
    return target, cond


def _mr_denoise_pair(
    data: dict[str, Any], i: int, gen: torch.Generator, own_noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MR restoration pair of sample ``i``: ``(target, cond)`` (see :func:`make_batch`,
    ``own_noise``)."""
    key = "t1w" if torch.rand((), generator=gen).item() < 0.5 else "t2w"
    clean = torch.from_numpy(data[key][i]).double()
    snr = 8.0 + 32.0 * torch.rand((), generator=gen).item()
    fg = clean > 0.1 * torch.quantile(clean.flatten(), 0.99)
    if own_noise > 0 and torch.rand((), generator=gen).item() < own_noise:
        o = MR_OWN_NOISE
        tex = _own_texture(tuple(clean.shape), gen).double()
        tex = (
            tex
            / tex.std().clamp_min(1e-6)
            * (o["tex_sd_hi"] * torch.rand((), generator=gen).item())
        )
        snr_own = (
            o["snr_lo"] + (o["snr_hi"] - o["snr_lo"]) * torch.rand((), generator=gen).item()
        )
        base = clean * (1.0 + tex)
        clean = _rician(
            base, base[fg].mean() / snr_own, gen
        )  # the "acquired" image = target
    sigma = clean[fg].mean() / snr
    noisy = _rician(clean, sigma, gen)
    s = float(torch.quantile(noisy.flatten(), 0.995))
    cond = (2.0 * noisy / s - 1.0).float()
    target = (2.0 * clean[1:2] / s - 1.0).float()
    return target, cond


def _crop_origin(les_i: torch.Tensor, h: int, w: int, crop: int, gen: torch.Generator,
                 lesion_crop: float) -> tuple[int, int]:
    """Top-left corner of a random crop; with probability ``lesion_crop`` the crop is centred
    on a random pixel of the lesion mask ``les_i`` ``(1, h, w)`` (when it has one)."""
    y0 = int(torch.randint(0, h - crop + 1, (), generator=gen))
    x0 = int(torch.randint(0, w - crop + 1, (), generator=gen))
    if lesion_crop > 0 and torch.rand((), generator=gen).item() < lesion_crop:
        ys, xs = torch.nonzero(les_i[0], as_tuple=True)
        if len(ys):
            j = int(torch.randint(0, len(ys), (), generator=gen))
            y0 = min(max(int(ys[j]) - crop // 2, 0), h - crop)
            x0 = min(max(int(xs[j]) - crop // 2, 0), w - crop)
    return y0, x0


def _paste_sharp_shapes(tgt_c: torch.Tensor, cond_c: torch.Tensor, base_c: torch.Tensor,
                        crop: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste pixel-sharp shapes (``SHARP_SHAPES``) into a cropped CT pair whose clean
    3 slices are ``base_c``: target and input alike, the input keeps its noise."""
    m, val = _sharp_shapes(crop, gen)
    delta = torch.where(
        m, val / CT_SCALE - base_c, torch.zeros(())
    )  # same shapes in the 3 slices
    tgt_c = tgt_c + delta[1:2]
    cond_c = (
        cond_c + delta
    )  # the noise stays (it comes from the rays through the whole body)
    return tgt_c, cond_c


def lesion_loss_weight(lesions: torch.Tensor, lesion_weight: float, grow: int = 2) -> torch.Tensor:
    """Per-pixel loss weight on the Haar grid (half resolution) from a pixel lesion mask
    ``(B, 1, H, W)``: 1 + ``lesion_weight`` inside lesions grown by ``grow`` px, divided by its
    mean so the loss keeps its scale."""
    grown = torch.nn.functional.max_pool2d(lesions, 2 * grow + 1, stride=1, padding=grow)
    half = torch.nn.functional.max_pool2d(grown, 2)
    w = 1.0 + lesion_weight * half
    return w / w.mean()


# --------------------------------------------------------------------------- checkpoints
def _save_checkpoint(
    run_dir: Path,
    net: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    step: int,
    gen: torch.Generator,
    extra: dict[str, Any],
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        tensors[f"net.{k}"] = v.detach().cpu().contiguous()
    for k, v in ema.items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                tensors[f"opt.{i}.{name}"] = st[name].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = run_dir / "checkpoint.tmp.safetensors"
    save_file(tensors, str(tmp))
    os.replace(tmp, run_dir / "checkpoint.safetensors")
    (run_dir / "checkpoint.json").write_text(json.dumps({"step": step, **extra}, indent=1))


def _load_checkpoint(run_dir: Path, net: torch.nn.Module, ema: dict[str, torch.Tensor],
                     opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
    t = load_file(str(run_dir / "checkpoint.safetensors"))
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")}, strict=True)
    for k in ema:
        ema[k].copy_(t[f"ema.{k}"])
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if f"opt.{i}.exp_avg" in t:
            opt.state[p] = {
                "step": torch.tensor(float(t[f"opt.{i}.step"][0])),
                "exp_avg": t[f"opt.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].to(p.device),
            }
    gen.set_state(t["rng.data"])
    torch.set_rng_state(t["rng.torch"])
    return int(meta["step"])


# --------------------------------------------------------------------------- training
def ema_decay(nominal: float | None, steps: int) -> float:
    """EMA decay actually used: ``nominal`` when given, else 0.995 capped so that the EMA window
    (1 / (1 - d)) is at most 10 % of the run. A fixed 0.995 (200-step window) on runs of ~250
    steps made the shipped weights an average over nearly the whole run, warm-up included."""
    if nominal is not None:
        return float(nominal)
    return min(0.995, 1.0 - 10.0 / max(steps, 20))


def _lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * prog))


@dataclass
class _Run:
    """One training run's model, optimiser, EMA and places (see :func:`_start_run`)."""

    cfg: dict[str, Any]
    model_dir: Path
    run_dir: Path
    metrics_path: Path
    gen: torch.Generator
    net: torch.nn.Module
    sched: RFlowScheduler
    out_ch: int
    t_max: int
    opt: torch.optim.Optimizer
    ema: dict[str, torch.Tensor]
    start_step: int


@dataclass
class _Recipe:
    """The loss recipe of a run, from its model config (see :func:`_loss_recipe`)."""

    use_amp: bool
    p_uncond: float
    t_hi: float
    k_res: float
    robust: bool
    x0_pred: bool
    ssim_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def _start_run(tc: TrainConfig, out_root: Path, run_dir: Path | str | None, resume: bool,
               device: str, threads: int) -> _Run:
    """Seed, build the network, optimiser and EMA, and resume from the run's checkpoint (or
    start a fresh metrics log)."""
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = model_config(tc)
    model_dir = out_root / cfg["model_id"]
    run_dir = Path(run_dir) if run_dir else out_root / f".runs/{cfg['model_id']}"
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    net = build_unet(cfg).to(device)
    sched = build_scheduler(cfg)
    _, out_ch = in_out_channels(cfg["io"])
    t_max = sched.num_train_timesteps
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.init_from:
        init = load_file(str(Path(tc.init_from) / "model.safetensors"))
        net.load_state_dict({k: v.to(device) for k, v in init.items()}, strict=True)
    ema = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    start_step = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume and (run_dir / "checkpoint.safetensors").exists():
        start_step = _load_checkpoint(run_dir, net, ema, opt, gen)
        planned = json.loads((run_dir / "checkpoint.json").read_text()).get("steps")
        if planned:
            tc.steps = int(planned)
        log.info("resumed %s at step %d of %d", cfg["model_id"], start_step, tc.steps)
    elif metrics_path.exists():
        metrics_path.unlink()
    return _Run(cfg=cfg, model_dir=model_dir, run_dir=run_dir, metrics_path=metrics_path,
                gen=gen, net=net, sched=sched, out_ch=out_ch, t_max=t_max, opt=opt, ema=ema,
                start_step=start_step)


def _loss_recipe(tc: TrainConfig, cfg: dict[str, Any], device: str) -> _Recipe:
    """Residual scale, condition dropout, training-time range, prediction and SSIM term."""
    ssim_loss = None
    if tc.ssim_weight:  # model_config checked that the recipe allows it
        from monai.losses import SSIMLoss

        ssim_loss = SSIMLoss(spatial_dims=2, data_range=2.0, kernel_sigma=1.5)
    return _Recipe(
        use_amp=device.startswith("cuda"),
        p_uncond=float(cfg["p_uncond"]),
        t_hi=float(cfg["train_t_max"]),
        k_res=float(cfg["io"].get("residual_scale") or 0.0),
        robust=bool(PRESETS[tc.task].get("robust", False)),
        x0_pred=cfg.get("prediction") == "x0",
        ssim_loss=ssim_loss,
    )


def _apply_time_budget(tc: TrainConfig, step: int, start_step: int, t0: float) -> None:
    """``max_minutes``: after the first 10 steps of a fresh run, lower ``tc.steps`` (never raise
    it) to what fits in the budget at the measured speed."""
    if tc.max_minutes and step == start_step + 10 and not start_step:
        per_step = (time.perf_counter() - t0) / 10
        fit = int(tc.max_minutes * 60 / per_step)
        if fit < tc.steps:
            log.info("time budget: %d -> %d steps (%.2f s/step)", tc.steps, fit, per_step)
            tc.steps = max(fit, 11)


def _step_loss(tc: TrainConfig, run: _Run, rc: _Recipe, data: dict[str, Any],
               device: str) -> torch.Tensor:
    """Draw a batch and compute the training loss of one step (the network in train mode)."""
    cfg, gen = run.cfg, run.gen
    target, cond, les = make_batch(
        cfg.get("data_task", tc.task),
        data,
        gen,
        tc.batch,
        tc.crop,
        robust=rc.robust,
        lesion_crop=tc.lesion_crop,
        fulldose_target=tc.fulldose_target,
        own_texture=tc.own_texture,
        sharp_shapes=tc.sharp_shapes,
        own_noise=tc.own_noise,
        with_lesions=True,
    )
    wmap = (
        lesion_loss_weight(les, tc.lesion_weight).to(device) if tc.lesion_weight else None
    )
    if rc.k_res:  # residual parameterisation: r = k (clean - received centre slice)
        ctr = int(cfg["io"]["context_slices"])
        target = (target - cond[:, ctr:ctr + 1]) * rc.k_res
    x0 = dwt2(target).to(device)
    c = dwt2(cond).to(device)
    with torch.autocast(
        device_type="cuda" if rc.use_amp else "cpu", dtype=torch.bfloat16, enabled=rc.use_amp
    ):
        if tc.objective == "diffusion":
            noise = torch.randn(x0.shape, generator=gen).to(device)
            tsteps = (
                (torch.rand(x0.shape[0], generator=gen) * (run.t_max * rc.t_hi))
                .long()
                .clamp_min(1)
                .to(device)
            )
            if rc.p_uncond > 0:
                keep = (
                    (torch.rand(x0.shape[0], generator=gen) >= rc.p_uncond).float().to(device)
                )
                c = c * keep.view(-1, 1, 1, 1)
            pred = training_prediction(run.net, run.sched, x0, c, noise, tsteps)
            if not rc.x0_pred:
                loss = torch.nn.functional.mse_loss(pred.float(), x0 - noise)
        else:
            pred = regression_predict(run.net, c, run.out_ch, run.t_max)
        if tc.objective == "regression" or rc.x0_pred:  # the output is the clean sample
            if wmap is not None:
                loss = (wmap * (pred.float() - x0) ** 2).mean()
            else:
                loss = torch.nn.functional.mse_loss(pred.float(), x0)
            if rc.ssim_loss is not None:
                # per channel (t1w, t2w), on the pixel grid the evaluation scores
                pp, tp = idwt2(pred.float()), target.to(device)
                b, ch = pp.shape[:2]
                loss = loss + tc.ssim_weight * rc.ssim_loss(
                    pp.reshape(b * ch, 1, *pp.shape[2:]),
                    tp.reshape(b * ch, 1, *tp.shape[2:]),
                )
    return loss


def _update_ema(net: torch.nn.Module, ema: dict[str, torch.Tensor], d: float) -> None:
    """``ema = d ema + (1 - d) weights`` for floating tensors; others are copied."""
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                ema[k].copy_(v)


def _write_model_folder(tc: TrainConfig, run: _Run, rc: _Recipe, data: dict[str, Any],
                        device: str, seconds: float, ema_loss: float | None,
                        data_description: str) -> Path:
    """Write the EMA weights, ``config.json`` (with the training record) and the card."""
    cfg, model_dir = run.cfg, run.model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.to(
            next(iter(run.net.state_dict().values())).dtype if v.is_floating_point() else v.dtype
        )
        .cpu()
        .contiguous()
        for k, v in run.ema.items()
    }
    tmp = model_dir / "model.tmp.safetensors"
    save_file(weights, str(tmp), metadata={"model_id": cfg["model_id"], "version": tc.version})
    os.replace(tmp, model_dir / "model.safetensors")
    cfg["n_parameters"] = count_parameters(run.net)
    cfg["training"] = {
        **{k: v for k, v in asdict(tc).items() if k not in ("architecture",)},
        "device": device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seconds": round(seconds, 1),
        "final_loss_ema": ema_loss,
        "ema_decay_used": ema_decay(tc.ema_decay, tc.steps),
        "robust_augmentation": ROBUST_CT if rc.robust else None,
        "own_texture_recipe": OWN_TEXTURE if tc.own_texture else None,
        "sharp_shapes_recipe": SHARP_SHAPES if tc.sharp_shapes else None,
        "own_noise_recipe": MR_OWN_NOISE if tc.own_noise else None,
        "data": data.get("meta", {}),
        "init_model": _init_description(tc.init_from) if tc.init_from else None,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    write_model_card(model_dir, data_description=data_description)
    return model_dir


def train(
    tc: TrainConfig,
    out_root: Path | str,
    data: dict[str, Any],
    *,
    run_dir: Path | str | None = None,
    resume: bool = False,
    device: str = "cpu",
    threads: int = 0,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    data_description: str = "",
) -> Path:
    """Train one model and write its folder ``<out_root>/<model_id>/``; returns that path.

    ``data`` comes from :func:`load_data` (or any dict with the same arrays). With
    ``resume=True`` training continues from ``run_dir/checkpoint.safetensors``; the run is
    then bit-identical to an uninterrupted one on the same device (RNG states restored).
    """
    run = _start_run(tc, Path(out_root), run_dir, resume, device, threads)
    rc = _loss_recipe(tc, run.cfg, device)
    net, opt = run.net, run.opt
    net.train()
    t0 = time.perf_counter()
    ema_loss = None
    with run.metrics_path.open("a") as mlog:
        step = run.start_step
        while step < tc.steps:
            _apply_time_budget(tc, step, run.start_step, t0)
            for g in opt.param_groups:  # warm-up + cosine decay, a pure function of the step
                g["lr"] = tc.lr * _lr_lambda(step, tc.warmup, tc.steps)
            loss = _step_loss(tc, run, rc, data, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            _update_ema(net, run.ema, min(ema_decay(tc.ema_decay, tc.steps),
                                          (1 + step) / (10 + step)))
            lv = float(loss.detach())
            ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
            done = step + 1
            rec = {"step": done, "loss": lv, "loss_ema": ema_loss, "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 2)}
            if done % tc.log_every == 0 or done == tc.steps:
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
            if done % tc.ckpt_every == 0 or done == tc.steps:
                _save_checkpoint(run.run_dir, net, run.ema, opt, done, run.gen,
                                 {"model_id": run.cfg["model_id"], "steps": tc.steps})
            if progress:
                progress(done, tc.steps, rec)
            step += 1
    seconds = time.perf_counter() - t0
    return _write_model_folder(tc, run, rc, data, device, seconds, ema_loss, data_description)


def average_models(
    sources: list[Path | str],
    out_dir: Path | str,
    *,
    weights: list[float] | None = None,
    version: str | None = None,
    model_id: str | None = None,
) -> Path:
    """Weight averaging ("model soup") of models of one architecture and task, e.g. a
    fine-tune and the model it started from: ``out_dir`` gets the weighted mean of the
    weights, the FIRST source's config (recipe, contract, sampling) with ``version`` /
    ``model_id`` replaced and ``training.weight_average`` listing every source (model id,
    version, weights SHA-256, weight), and a refreshed card. Refuses different architectures,
    tasks or tensor names / shapes."""
    if len(sources) < 2:
        raise ValueError("averaging needs at least two models")
    w = [1.0 / len(sources)] * len(sources) if weights is None else [float(x) for x in weights]
    if len(w) != len(sources) or any(x < 0 for x in w) or abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(
            f"weights must be {len(sources)} non-negative numbers summing to 1, got {w}"
        )
    dirs = [Path(d) for d in sources]
    cfgs = [json.loads((d / "config.json").read_text()) for d in dirs]
    for d, c in zip(dirs[1:], cfgs[1:], strict=True):
        for key in ("architecture", "tasks", "objective", "io", "normalisation"):
            if c.get(key) != cfgs[0].get(key):
                raise ValueError(
                    f"{d}: {key} differs from {dirs[0]}; only models of one architecture and "
                    "task can be averaged"
                )
    states = [load_file(str(d / "model.safetensors")) for d in dirs]
    for d, st in zip(dirs[1:], states[1:], strict=True):
        if {k: tuple(v.shape) for k, v in st.items()} != {
            k: tuple(v.shape) for k, v in states[0].items()
        }:
            raise ValueError(f"{d}: tensor names or shapes differ from {dirs[0]}")
    zero = torch.zeros((), dtype=torch.float64)  # sum()'s start, typed as a tensor
    avg = {
        k: sum((wi * st[k].double() for wi, st in zip(w, states, strict=True)), zero)
        .to(states[0][k].dtype)
        .contiguous()
        for k in states[0]
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(avg, str(out / "model.safetensors"))
    cfg = json.loads(json.dumps(cfgs[0]))
    cfg["model_id"] = model_id or cfg["model_id"]
    cfg["version"] = version or cfg["version"]
    cfg.setdefault("training", {})["weight_average"] = [
        {
            "model_id": c["model_id"],
            "version": c["version"],
            "weight": wi,
            "weights_sha256": _sha256_file(d / "model.safetensors"),
        }
        for d, c, wi in zip(dirs, cfgs, w, strict=True)
    ]
    (out / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    # the first source's training-data text carries over; its held-out metrics do not (other
    # weights)
    src_card = dirs[0] / "MODEL_CARD.md"
    data_txt = _card_section(src_card.read_text(), "Training data") if src_card.exists() else None
    (out / "MODEL_CARD.md").unlink(missing_ok=True)
    write_model_card(out, data_description=data_txt or "")
    return out


#: the sections write_model_card writes after "Training data", in order
_CARD_TAIL = ("Training data", "Held-out metrics", "Limitations")


def _card_section(card_text: str, title: str) -> str | None:
    """The body of a ``## title`` section of a model card (one of ``_CARD_TAIL`` but the last),
    or None. It ends at the card's NEXT section, not at any ``## `` line: held-out metrics
    pasted from an evaluation report carry ``## `` headings of their own."""
    head = f"## {title}\n"
    if head not in card_text:
        return None
    body = card_text.split(head, 1)[1]
    nxt = f"\n## {_CARD_TAIL[_CARD_TAIL.index(title) + 1]}\n"
    return (body.split(nxt, 1)[0] if nxt in body else body.split("\n## ", 1)[0]).strip()


def _init_description(model_dir: str) -> str:
    d = Path(model_dir)
    c = json.loads((d / "config.json").read_text())
    return (f"{c['model_id']} {c['version']}, weights SHA-256 "
            f"{_sha256_file(d / 'model.safetensors')}")


# --------------------------------------------------------------------------- model card
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_model_card(model_dir: Path | str, *, data_description: str = "",
                     metrics_md: str | None = None) -> Path:
    """(Re)write ``MODEL_CARD.md`` from ``config.json`` and the weights file.

    ``metrics_md`` (held-out metrics, Markdown) replaces the metrics section; when omitted the
    section already in the card is kept.
    """
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    digest = _sha256_file(model_dir / "model.safetensors")
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    card = model_dir / "MODEL_CARD.md"
    txt = card.read_text() if card.exists() else ""
    old_metrics = _card_section(txt, "Held-out metrics")
    old_data = _card_section(txt, "Training data")
    metrics = metrics_md or old_metrics or "Not evaluated yet (run `synthnode engine evaluate`)."
    data_txt = data_description or old_data or "see config.json training.data"
    lines = [
        *_card_header(cfg, digest, size_mb),
        *_card_architecture(cfg),
        *_card_contract(cfg),
        *_card_recipe(cfg),
        *_card_tail(data_txt, metrics),
    ]
    card.write_text("\n".join(lines))
    return card


def _card_header(cfg: dict[str, Any], digest: str, size_mb: float) -> list[str]:
    """Title, identity, weights and intended use."""
    return [
        f"# Model card: {cfg['model_id']} {cfg['version']}",
        "",
        f"- model_id: `{cfg['model_id']}`",
        f"- version: `{cfg['version']}`",
        f"- tasks: {', '.join(f'`{t}`' for t in cfg['tasks'])}",
        f"- objective: `{cfg['objective']}`",
        f"- weights: `model.safetensors` ({size_mb:.2f} MB, "
        f"{cfg.get('n_parameters', '?')} parameters)",
        f"- weights SHA-256: `{digest}`",
        "- intended use: research and engineering validation of the synthnode pipeline on phantoms;"
        " NOT for diagnosis. Outputs are synthetic and must be labelled as such.",
        "",
    ]


def _card_architecture(cfg: dict[str, Any]) -> list[str]:
    """The "Architecture" section: network, sub-bands, conditioning, noise process."""
    arch = cfg["architecture"]
    io = cfg["io"]
    prediction = (
        "clean-sample (x0) prediction, the step's velocity derived from it, training times up to "
        f"{cfg.get('train_t_max', 1.0)} T"
        if cfg.get("prediction") == "x0"
        else "velocity prediction"
    )
    return [
        "## Architecture",
        "",
        f"MONAI `DiffusionModelUNet` (2-D), channels {arch['channels']}, "
        f"{arch['num_res_blocks']} residual block(s) per level, no attention, GroupNorm groups "
        f"{arch['norm_num_groups']}; runs on one-level orthonormal Haar sub-bands (4 per image "
        f"channel, half resolution). Conditioning by concatenation: {io['cond_channels']} "
        f"condition channel(s) x {2 * io['context_slices'] + 1} slices (2.5D context). Noise "
        "process: MONAI `RFlowScheduler` (rectified flow, T = "
        f"{cfg['scheduler']['num_train_timesteps']}, {prediction}); sampling: Euler steps with "
        "per-slice dynamic thresholding (clip form).",
        "",
    ]


def _card_contract(cfg: dict[str, Any]) -> list[str]:
    """The "Input contract" section: the task contracts, normalisation, sampling defaults."""
    return [
        "## Input contract",
        "",
        "```json",
        json.dumps(cfg["input_contract"], indent=1),
        "```",
        "",
        "Normalisation: `" + json.dumps(cfg["normalisation"]) + "`",
        "",
        "Sampling defaults: `" + json.dumps(cfg.get("sampling", {})) + "`",
        "",
    ]


def _card_recipe(cfg: dict[str, Any]) -> list[str]:
    """The "Training recipe" section, from the config's training record."""
    tr = cfg.get("training", {})
    ema = tr.get("ema_decay_used", tr.get("ema_decay"))
    return [
        "## Training recipe",
        "",
        f"- objective `{cfg['objective']}`, {tr.get('steps')} steps, batch {tr.get('batch')}, "
        f"random {tr.get('crop')}x{tr.get('crop')} crops of {tr.get('size')} px phantoms (fully "
        "convolutional; runs at 512x512), "
        f"AdamW lr {tr.get('lr')} (weight decay {tr.get('weight_decay')}), warm-up "
        f"{tr.get('warmup')} steps then cosine decay to 5 %, gradient clip 1.0, EMA {ema} "
        "(shipped weights = EMA), "
        f"condition dropout {cfg.get('p_uncond')}",
        *_card_augmentation_lines(tr),
        *_card_provenance_lines(cfg, tr),
        f"- seed {tr.get('seed')}; device {tr.get('device')}; torch {tr.get('torch')}; "
        f"{tr.get('seconds')} s; final training loss (EMA) {tr.get('final_loss_ema')}",
        _card_command(cfg, tr),
        "",
    ]


def _card_augmentation_lines(tr: dict[str, Any]) -> list[str]:
    """Recipe lines of the data augmentations and loss terms the run used."""
    lines = []
    if tr.get("robust_augmentation"):
        ra = tr["robust_augmentation"]
        lines.append(
            f"- robustness augmentation (CT restoration): with probability {ra['p_scale']} the "
            f"received noise is scaled by U({ra['scale_lo']}, 1); with probability "
            f"{ra['p_single']} the 2.5D neighbours are replaced by the centre slice "
            "(`engine.research.train.make_batch`)"
        )
    if tr.get("lesion_weight") or tr.get("lesion_crop"):
        lines.append(
            f"- lesion emphasis: per-pixel loss weight 1 + {tr.get('lesion_weight', 0)} inside "
            "lesions grown by 2 px (normalised), crops centred on a lesion with probability "
            f"{tr.get('lesion_crop', 0)}"
        )
    if tr.get("ssim_weight"):
        lines.append(
            f"- structure term: loss = MSE + {tr['ssim_weight']} x (1 - SSIM) of the pixel-domain "
            "prediction (MONAI SSIMLoss, Gaussian sigma 1.5, data range 2, per output channel)"
        )
    if tr.get("fulldose_target"):
        own_texture = (
            f"; in {tr['own_texture']} of them the full-dose image's own noise is a synthetic "
            f"correlated texture {tr.get('own_texture_recipe')} instead of the phantom's "
            "projection-domain noise"
            if tr.get("own_texture")
            else ""
        )
        lines.append(
            "- full-dose targets (the real-scan evaluation protocol, LDCT practice): with "
            f"probability {tr['fulldose_target']} a pair is input = full-dose CT + independent "
            "extra noise bringing it to dose d, target = that full-dose CT with its own noise "
            f"(`engine.research.train.make_batch`){own_texture}"
        )
    if tr.get("sharp_shapes"):
        lines.append(
            f"- sharp shapes: with probability {tr['sharp_shapes']} pixel-sharp ellipses "
            f"{tr.get('sharp_shapes_recipe')} are pasted into the crop (target and input alike, "
            "the input keeps its noise), so edges sharper than the phantoms' are kept"
        )
    if tr.get("own_noise"):
        lines.append(
            "- own-noise targets (MR, the real-scan evaluation protocol): with probability "
            f"{tr['own_noise']} the target keeps its own Rician noise and a correlated texture "
            f"{tr.get('own_noise_recipe')} and the input is that image plus Rician noise at the "
            "drawn SNR (`engine.research.train.make_batch`)"
        )
    return lines


def _card_provenance_lines(cfg: dict[str, Any], tr: dict[str, Any]) -> list[str]:
    """Recipe lines on where the weights and sampling defaults came from: the initial model,
    a weight average, sampling defaults chosen after training."""
    lines = []
    if tr.get("init_from"):
        lines.append(
            f"- initialised from `{tr['init_from']}`"
            + (f" ({tr['init_model']})" if tr.get("init_model") else "")
        )
    if tr.get("weight_average"):
        sources = ", ".join(
            f"{a['model_id']} {a['version']} (weight {a['weight']:g}, "
            f"SHA-256 {a['weights_sha256'][:12]}...)"
            for a in tr["weight_average"]
        )
        lines.append(
            "- the recipe above is that of the first averaged model; shipped weights = weighted "
            f"mean of the weights of {sources} (`synthnode engine average`)"
        )
    trained, sampled = _card_sampling_defaults(cfg, tr)
    if sampled != trained:
        lines.append(
            "- sampling defaults changed after training (chosen on the validation split): "
            f"{json.dumps(sampled)} instead of the training command's {json.dumps(trained)}"
        )
    return lines


def _card_sampling_defaults(
    cfg: dict[str, Any], tr: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trained, sampled)``: the sampling defaults the training command wrote and those in the
    config now (edited after a validation-split choice). Models without a preset or a training
    record are not compared (both are the trained ones). Keyed by the inference task: the
    ct_augment recipe's task is "augment"."""
    task_key = (cfg.get("tasks") or [cfg.get("task", "")])[0]
    preset = PRESETS.get(cfg.get("task", ""), {}).get("sampling", {}).get(task_key, {})
    trained = {**preset, **(tr.get("sampling") or {})}
    sampled = cfg.get("sampling", {}).get(task_key, {}) if tr and preset else trained
    return trained, sampled


def _card_command(cfg: dict[str, Any], tr: dict[str, Any]) -> str:
    """The recipe's ``synthnode engine train`` command line (options that were set)."""
    options = [  # (option, training key, whether the run set it)
        ("--ema-decay", "ema_decay", tr.get("ema_decay") is not None),
        ("--lesion-weight", "lesion_weight", bool(tr.get("lesion_weight"))),
        ("--lesion-crop", "lesion_crop", bool(tr.get("lesion_crop"))),
        ("--ssim-weight", "ssim_weight", bool(tr.get("ssim_weight"))),
        ("--fulldose-target", "fulldose_target", bool(tr.get("fulldose_target"))),
        ("--own-texture", "own_texture", bool(tr.get("own_texture"))),
        ("--sharp-shapes", "sharp_shapes", bool(tr.get("sharp_shapes"))),
        ("--own-noise", "own_noise", bool(tr.get("own_noise"))),
        ("--prediction", "prediction", tr.get("prediction", "velocity") != "velocity"),
        ("--train-t-max", "train_t_max", tr.get("train_t_max") is not None),
        ("--p-uncond", "p_uncond", tr.get("p_uncond") is not None),
    ]
    cmd = (
        f"synthnode engine train {cfg['task']} --objective {cfg['objective']} "
        f"--steps {tr.get('steps')} --crop {tr.get('crop')} --batch {tr.get('batch')} "
        f"--lr {tr.get('lr')} --n-train {tr.get('n_train')} --size {tr.get('size')} "
        f"--seed {tr.get('seed')}"
        + "".join(f" {opt} {tr[key]}" for opt, key, given in options if given)
        + "".join(f" --sample {k}={v}" for k, v in (tr.get("sampling") or {}).items())
        + (f" --init {tr['init_from']}" if tr.get("init_from") else "")
    )
    minutes = (
        " (the run used `--minutes`, which fixed the step count after 10 steps; the count above "
        "is the one used)"
        if tr.get("max_minutes")
        else ""
    )
    return f"- command: `{cmd}`{minutes}"


def _card_tail(data_txt: str, metrics: str) -> list[str]:
    """The "Training data", "Held-out metrics" and "Limitations" sections (``_CARD_TAIL``)."""
    return [
        "## Training data",
        "",
        data_txt,
        "",
        "## Held-out metrics",
        "",
        metrics,
        "",
        "## Limitations",
        "",
        "Trained for minutes on a 2-core CPU on procedural phantoms only; quality on real scanner "
        "data is not established. CT->MR output intensities are in the phantom's arbitrary units; "
        "no bias field is synthesised.",
        "",
    ]


def initial_model(tc: TrainConfig) -> tuple[dict[str, Any], bytes]:
    """Config and safetensors bytes of a freshly initialised (seeded) model: for tests and
    smoke runs, with exactly the layout a trained model has."""
    from safetensors.torch import save

    cfg = model_config(tc)
    torch.manual_seed(tc.seed)
    net = build_unet(cfg)
    cfg["n_parameters"] = count_parameters(net)
    return cfg, save({k: v.contiguous() for k, v in net.state_dict().items()})


def derive_model(src_dir: Path | str, dst_dir: Path | str, *, model_id: str, tasks: list[str],
                 note: str) -> Path:
    """A second model folder with the SAME weights serving other task(s) (e.g. augmentation
    with the restoration model), so the model gate approves each intended use on its own."""
    import shutil

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    cfg = json.loads((src_dir / "config.json").read_text())
    bad = [t for t in tasks if t not in cfg["tasks"]]
    if bad:
        raise ValueError(f"{cfg['model_id']} cannot serve {bad}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_dir / "model.safetensors", dst_dir / "model.safetensors")
    cfg.update(
        model_id=model_id,
        tasks=tasks,
        input_contract={t: TASKS[t].describe() for t in tasks},
        derived_from={"model_id": cfg["model_id"], "version": cfg["version"], "note": note},
    )
    (dst_dir / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    old = (src_dir / "MODEL_CARD.md").read_text()
    data = (
        old.split("## Training data\n", 1)[1].split("\n## ", 1)[0].strip()
        if "## Training data\n" in old
        else ""
    )
    write_model_card(dst_dir, data_description=data, metrics_md="Not evaluated yet.")
    return dst_dir

