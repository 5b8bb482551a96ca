"""Task registry: typed input contracts and one ``run`` per task.

Tasks
-----
``ct_denoise``  low-dose CT restoration; HU in, HU out; any slice size of at least 16 px
                (padded to a multiple of 16 and cropped back); starts from the received
                image (SDEdit-style partial noising at ``strength``) and takes 1-2 flow steps.
``mr_denoise``  MR restoration (Rician noise); arbitrary units in and out (per-volume
                percentile normalisation, inverted on output).
``ct_to_mr``    CT (HU) -> T1w or T2w MR (param ``target``), 6-8 flow steps from pure noise
                conditioned on the CT; output >= 0 (MR magnitude: values the network puts
                below 0 are clamped to 0).
``augment``     N plausible variants of a slice stack: partial noising with ``strength`` and
                3-5 denoising steps with the condition dropped (the ``ct_augment`` model is
                trained with condition dropout, so it is also an unconditional generator);
                anatomy is kept because the low frequencies of the start sample survive the
                partial noising.

Restoration models may be *residual* (``io.residual_scale = k``): the flow then runs on
``k * (clean - received)``, whose start value (zero residual) is the received image itself.

Every task sees a conditioned input (:mod:`engine.conditioning`): out-of-FOV and padding
pixels become air / background for the network and are put back unchanged after it, CT air
noise below -1024 HU is raised to that floor, and CT -> MR outputs are background outside the
CT's body outline.

Every task runs on Haar sub-bands (engine.wavelet) with 2.5D context: each slice is
conditioned on itself and ``context_slices`` neighbours on each side (edge slices repeat).
Noise is drawn on the CPU from one ``torch.Generator`` seeded with ``seed`` for the whole
volume, so results do not depend on the device or on ``batch_slices``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.conditioning import condition, restore
from engine.models import LoadedModel
from engine.nets import (
    dynamic_threshold,
    ilvr,
    in_out_channels,
    lowpass,
    regression_predict,
    rflow_sample,
)
from engine.types import Intensity, Provenance, TaskName, TaskResult, Volume
from engine.wavelet import dwt2, idwt2

if TYPE_CHECKING:
    from monai.networks.schedulers import RFlowScheduler

log = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "ParamSpec",
    "RunOptions",
    "TaskInputError",
    "TaskSpec",
    "check_input",
    "context_stack",
    "denormalise",
    "execute",
    "normalise",
    "validate_params",
]

MR_KINDS = (Intensity.MR, Intensity.MR_T1W, Intensity.MR_T2W)


class TaskInputError(ValueError):
    """The volume, the parameters or the model do not satisfy the task's contract."""


@dataclass(frozen=True)
class ParamSpec:
    """One task parameter: type, default (None = taken from the model config), range/choices."""

    type: type
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def coerce(self, name: str, value: Any) -> Any:
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise TaskInputError(f"parameter {name!r} must be an integer, got {value!r}")
            value = int(value)
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(
                value, (int, float, np.floating, np.integer)
            ):
                raise TaskInputError(f"parameter {name!r} must be a number, got {value!r}")
            value = float(value)
        elif self.type is str:
            if not isinstance(value, str):
                raise TaskInputError(f"parameter {name!r} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise TaskInputError(
                f"parameter {name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        if self.minimum is not None and value < self.minimum:
            raise TaskInputError(f"parameter {name!r} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise TaskInputError(f"parameter {name!r} must be <= {self.maximum}, got {value!r}")
        return value


@dataclass(frozen=True)
class RunOptions:
    """Runtime options (from ``settings.engine``): device, slices per batch, bf16, threads."""

    device: str = "cpu"
    batch_slices: int = 1
    bf16_on_gpu: bool = True
    threads: int = 0


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its typed input contract and its runner."""

    name: TaskName
    description: str
    input_intensities: tuple[Intensity, ...]
    params: dict[str, ParamSpec]
    run: Callable[[TaskSpec, LoadedModel, Volume, dict[str, Any], int, RunOptions], _Run]
    size_multiple: int = 16
    min_size: int = 16
    contract: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-able input contract (goes into model cards and config.json)."""
        return {
            "task": self.name,
            "input_intensities": [i.value for i in self.input_intensities],
            "shape": (
                f"(z, y, x) float32; y and x >= {self.min_size} (padded to a multiple of "
                f"{self.size_multiple} by engine.conditioning)"
            ),
            "params": {
                k: {
                    "type": p.type.__name__,
                    "default": p.default,
                    "min": p.minimum,
                    "max": p.maximum,
                    "choices": list(p.choices) if p.choices else None,
                    "help": p.help,
                }
                for k, p in self.params.items()
            },
            **self.contract,
        }


@dataclass
class _Run:
    outputs: list[Volume]
    steps: int
    extra: dict[str, Any]


# --------------------------------------------------------------------------- normalisation
def normalise(data: np.ndarray, spec: dict[str, Any]) -> tuple[np.ndarray, dict[str, float]]:
    """Physical intensities -> network units; returns the state needed to invert.

    ``spec["kind"]``: ``"hu"`` (x = HU / scale; exact inverse, HU preserved), ``"percentile"``
    (x = 2 v / s - 1 with s = the ``q`` quantile of this volume; for MR in arbitrary units),
    ``"fixed"`` (x = 2 v / scale - 1 with a scale fixed at training time).
    """
    kind = spec["kind"]
    if kind == "hu":
        scale = float(spec.get("scale", 1000.0))
        return (data / scale).astype(np.float32), {"scale": scale}
    if kind == "percentile":
        s = float(np.quantile(data, float(spec.get("q", 0.995))))
        if not np.isfinite(s) or s <= 0:
            s = float(np.max(np.abs(data))) or 1.0
        return (2.0 * data / s - 1.0).astype(np.float32), {"scale": s}
    if kind == "fixed":
        s = float(spec["scale"])
        return (2.0 * data / s - 1.0).astype(np.float32), {"scale": s}
    raise ValueError(f"unknown normalisation kind {kind!r}")


def denormalise(x: np.ndarray, spec: dict[str, Any], state: dict[str, float]) -> np.ndarray:
    """Inverse of :func:`normalise` with the state it returned."""
    kind = spec["kind"]
    if kind == "hu":
        return (x * state["scale"]).astype(np.float32)
    if kind in ("percentile", "fixed"):
        return ((x + 1.0) * 0.5 * state["scale"]).astype(np.float32)
    raise ValueError(f"unknown normalisation kind {kind!r}")


def context_stack(x: torch.Tensor, k: int) -> torch.Tensor:
    """2.5D context: ``(z, C, H, W)`` -> ``(z, C*(2k+1), H, W)`` with neighbours
    ``i-k .. i+k`` (edge slices repeated), ordered from ``i-k`` to ``i+k``."""
    if k == 0:
        return x
    z = x.shape[0]
    idx = [torch.clamp(torch.arange(z) + d, 0, z - 1) for d in range(-k, k + 1)]
    return torch.cat([x[i] for i in idx], dim=1)


# --------------------------------------------------------------------------- core engine
def _autocast(device: str, opts: RunOptions):
    if device.startswith("cuda") and opts.bf16_on_gpu:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


# test-time ensemble order: identity, horizontal flip, 180 degrees, 180 + flip, then the
# 90 / 270 degree rotations with and without flip; (quarter turns k, flip)
DIHEDRAL: tuple[tuple[int, bool], ...] = ((0, False), (0, True), (2, False), (2, True),
                                          (1, False), (1, True), (3, False), (3, True))


def _dihedral(x: torch.Tensor, g: tuple[int, bool], inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) a dihedral transform to the last two axes."""
    k, flip = g
    if inverse:
        x = torch.flip(x, dims=(-1,)) if flip else x
        return torch.rot90(x, -k, dims=(-2, -1))
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _ensemble(model: LoadedModel, params: dict[str, Any]) -> int:
    n = int(params.get("ensemble") or 1)
    if n > 1 and model.objective != "regression":
        raise TaskInputError(
            f"ensemble applies to regression models; {model.model_id} is a {model.objective} model"
        )
    return n


def _sample_seeds(model: LoadedModel, params: dict[str, Any], seed: int) -> list[int]:
    """Seeds of the posterior samples whose mean is the output (``samples``, diffusion models).

    Sample 0 uses ``seed`` itself, so ``samples`` 1 is the single-sample output; sample j > 0
    uses ``SeedSequence([seed, j])``.
    """
    n = int(params.get("samples") or 1)
    if n > 1 and model.objective != "diffusion":
        raise TaskInputError(
            f"samples applies to diffusion models; {model.model_id} is a {model.objective} model "
            "(its output is already a mean: see ensemble)"
        )
    return [int(seed)] + [
        int(np.random.SeedSequence([int(seed), j]).generate_state(1, dtype=np.uint32)[0])
        for j in range(1, n)
    ]


#: ``sample_transforms`` "flips": sample j runs in the frame of ``SAMPLE_FLIPS[j % 4]`` (the
#: shape-keeping part of ``DIHEDRAL``: identity, left-right flip, 180 degree rotation, both)
SAMPLE_FLIPS = DIHEDRAL[:4]


def _sample_frames(model: LoadedModel, params: dict[str, Any], n: int) -> list[tuple[int, bool]]:
    """The frame each posterior sample runs in (``sample_transforms``, diffusion models)."""
    mode = params.get("sample_transforms") or "none"
    if mode == "none":
        return [DIHEDRAL[0]] * n
    if model.objective != "diffusion":
        raise TaskInputError(
            f"sample_transforms applies to diffusion models; {model.model_id} is a "
            f"{model.objective} model (see ensemble)"
        )
    return [SAMPLE_FLIPS[j % len(SAMPLE_FLIPS)] for j in range(n)]


def _predict_mean(
    model: LoadedModel,
    cond: torch.Tensor | None,
    init: torch.Tensor | None,
    *,
    seeds: list[int],
    frames: list[tuple[int, bool]] | None = None,
    **kw: Any,
) -> torch.Tensor:
    """:func:`_predict` once per seed, averaged (the mean of posterior samples moves a sampler
    towards the posterior mean, which PSNR rewards; cost x len(seeds)).

    ``frames[j]`` (a ``DIHEDRAL`` element): sample j runs on the flipped / rotated slices and its
    output is turned back, so the mean also averages the network's orientation-dependent errors
    (a test-time ensemble inside the sample mean, at no extra cost).
    """
    frames = frames or [DIHEDRAL[0]] * len(seeds)
    total: torch.Tensor | None = None
    for s, g in zip(seeds, frames, strict=True):
        if g == DIHEDRAL[0]:
            y = _predict(model, cond, init, seed=s, **kw)
        else:
            y = _dihedral(
                _predict(
                    model,
                    None if cond is None else _dihedral(cond, g),
                    None if init is None else _dihedral(init, g),
                    seed=s,
                    **kw,
                ),
                g,
                inverse=True,
            )
        total = y if total is None else total + y
    assert total is not None
    return total / len(seeds)


def _seeds_record(seeds: list[int], frames: list[tuple[int, bool]] | None = None) -> dict[str, Any]:
    """Provenance ``extra`` for a mean of samples: the seeds (and the frames, where any sample
    was flipped), where there is more than one."""
    if len(seeds) < 2:
        return {}
    rec: dict[str, Any] = {"sample_seeds": seeds}
    if frames and any(g != DIHEDRAL[0] for g in frames):
        rec["sample_frames"] = [{"rot90": k, "flip_lr": f} for k, f in frames]
    return rec


def _predict(
    model: LoadedModel,
    cond: torch.Tensor | None,
    init: torch.Tensor | None,
    *,
    start: float,
    steps: int,
    seed: int,
    opts: RunOptions,
    threshold: float | None,
    drop_condition: bool = False,
    ensemble: int = 1,
    guide_sigma: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Run the model over a slice stack in batches.

    ``guide_sigma`` (with ``init``): low-frequency fidelity to the received image, the
    prediction keeps the Gaussian low-pass (sigma in pixels, rows / columns) of ``init``
    (:func:`engine.nets.ilvr`): a diffusion model at every step (ILVR), a regressor once on
    its output. For a residual model the flow's sample is ``k (clean - received)``, so keeping
    the received low-pass means a residual without low-pass: ``r - lp(r)``.

    ``ensemble`` (regression models): the prediction is the mean over the first ``ensemble``
    of ``DIHEDRAL`` (flips / rotations applied to the pixel-domain condition, undone on the
    output), a test-time ensemble of the same weights.

    cond  ``(z, Cc, H, W)`` normalised condition image (before 2.5D stacking / DWT)
    init  ``(z, Ct, H, W)`` normalised start image for partial noising, or None (pure noise)
    Returns ``(z, Ct, H, W)`` normalised prediction (float32, CPU).
    """
    io = model.config["io"]
    k = int(io.get("context_slices", 0))
    _, out_ch = in_out_channels(io)
    k_res = io.get("residual_scale")
    cond_w, noise, init_w = _network_inputs(model, cond, init, seed=seed,
                                            drop_condition=drop_condition)
    z = cond_w.shape[0]
    floor = float(model.config.get("sampling", {}).get("threshold_floor", 1.0))
    device = opts.device
    model.to(device)
    scheduler = model.scheduler()
    t_max = scheduler.num_train_timesteps
    if guide_sigma is not None and init is None:
        raise TaskInputError("low-pass guidance needs the received image")

    def reference_low(sl: slice) -> torch.Tensor | float | None:
        """The low-pass the prediction keeps: the received image's, or 0 for a residual."""
        if guide_sigma is None or init is None:
            return None
        return 0.0 if k_res else lowpass(init[sl].to(device), guide_sigma)

    # the 2.5D condition in pixels, for the flipped / rotated copies of the ensemble
    ens_pix = (
        context_stack(cond, k)
        if model.objective == "regression"
        and ensemble > 1
        and cond is not None
        and not drop_condition
        else None
    )
    outs = []
    with torch.inference_mode():
        for b0 in range(0, z, opts.batch_slices):
            sl = slice(b0, min(z, b0 + opts.batch_slices))
            c = cond_w[sl].to(device)
            if ens_pix is not None:
                # test-time ensemble: pixel-domain mean of the transformed predictions
                out = _ensemble_regression(model, c, ens_pix[sl], ensemble, out_ch, t_max, opts)
            elif model.objective == "regression":
                with _autocast(device, opts):
                    y = regression_predict(model.net, c, out_ch, t_max)
                out = idwt2(y.float()).cpu()
            else:
                xform = (
                    None
                    if guide_sigma is None and threshold is None
                    else _x0_transform(reference_low(sl), guide_sigma, threshold, floor)
                )
                out = _sample_slices(
                    model,
                    scheduler,
                    c,
                    noise[sl],
                    None if init_w is None else init_w[sl],
                    start=start,
                    steps=steps,
                    xform=xform,
                    opts=opts,
                )
            if guide_sigma is not None and model.objective == "regression":
                ref_low = reference_low(sl)
                assert ref_low is not None  # guide_sigma needs init (refused above)
                out = ilvr(out.to(device), ref_low, guide_sigma).cpu()
            if k_res and init is not None:  # (a residual model without init was refused above)
                out = init[sl] + out / float(k_res)
            outs.append(out)
    return torch.cat(outs, dim=0)


def _network_inputs(
    model: LoadedModel,
    cond: torch.Tensor | None,
    init: torch.Tensor | None,
    *,
    seed: int,
    drop_condition: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The whole stack's network inputs in sub-bands: ``(cond_w, noise, init_w)``, the 2.5D
    condition (zeros when dropped or absent), the seeded start noise and the start image
    (None without ``init``; zeros for a residual model)."""
    io = model.config["io"]
    k = int(io.get("context_slices", 0))
    in_ch, out_ch = in_out_channels(io)
    ref = cond if cond is not None else init
    assert ref is not None
    z, _, h, w = ref.shape
    cond_w = dwt2(context_stack(cond, k)) if cond is not None else None
    if drop_condition or cond_w is None:
        cond_w = torch.zeros(z, in_ch - out_ch, h // 2, w // 2)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(z, out_ch, h // 2, w // 2, generator=gen)
    # residual models (io.residual_scale = k) learn r = k * (clean - received) for restoration:
    # the start sample of the flow is then r = 0 (the received image itself)
    k_res = io.get("residual_scale")
    if k_res and init is None:
        raise TaskInputError("a residual model needs the received image")
    init_w = (torch.zeros_like(dwt2(init)) if k_res else dwt2(init)) if init is not None else None
    return cond_w, noise, init_w


def _ensemble_regression(model: LoadedModel, c: torch.Tensor, cond_pix: torch.Tensor,
                         ensemble: int, out_ch: int, t_max: int,
                         opts: RunOptions) -> torch.Tensor:
    """A regressor's test-time ensemble over one batch: the pixel-domain mean of its
    predictions on the first ``ensemble`` of ``DIHEDRAL`` (the 2.5D condition ``cond_pix``
    ``(b, Cc, H, W)`` in pixels flipped / rotated, each output turned back); ``c`` is the
    untransformed condition in sub-bands. Returns ``(b, Ct, H, W)`` on the CPU."""
    b, _, h, w = cond_pix.shape
    device = opts.device
    # image channels, not sub-bands (out_ch counts 4 Haar sub-bands per channel)
    out = torch.zeros(b, int(model.config["io"]["target_channels"]), h, w)
    for g in DIHEDRAL[:ensemble]:
        cg = c if g == DIHEDRAL[0] else dwt2(_dihedral(cond_pix, g)).to(device)
        with _autocast(device, opts):
            yg = regression_predict(model.net, cg, out_ch, t_max)
        out += _dihedral(idwt2(yg.float()).cpu(), g, inverse=True)
    out /= ensemble
    return out


def _x0_transform(ref_low: torch.Tensor | float | None, guide_sigma: tuple[float, float] | None,
                  threshold: float | None, floor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x0 transform of one batch: ILVR guidance towards ``ref_low``, then dynamic
    thresholding."""

    def xform(x0w: torch.Tensor) -> torch.Tensor:
        x0 = idwt2(x0w.float())
        if ref_low is not None and guide_sigma is not None:
            x0 = ilvr(x0, ref_low, guide_sigma)
        if threshold is not None:
            x0 = dynamic_threshold(x0, threshold, floor)
        return dwt2(x0).to(x0w.dtype)
    return xform


def _sample_slices(
    model: LoadedModel,
    scheduler: RFlowScheduler,
    c: torch.Tensor,
    noise: torch.Tensor,
    init_w: torch.Tensor | None,
    *,
    start: float,
    steps: int,
    xform: Callable[[torch.Tensor], torch.Tensor] | None,
    opts: RunOptions,
) -> torch.Tensor:
    """A diffusion model's flow over one batch: from ``init_w`` noised to ``start`` (or from
    pure ``noise`` without a start image), ``steps`` Euler steps. Returns pixels on the CPU."""
    device = opts.device
    t_max = scheduler.num_train_timesteps
    n = noise.to(device)
    if init_w is not None and start < 1.0:
        t0 = torch.full((n.shape[0],), round(start * t_max), dtype=torch.long, device=device)
        x = scheduler.add_noise(init_w.to(device), n, t0)
    else:
        x = n
    with _autocast(device, opts):
        y = rflow_sample(
            model.net,
            scheduler,
            c,
            x,
            start if init_w is not None else 1.0,
            steps,
            xform,
            prediction=model.config.get("prediction", "velocity"),
        )
    return idwt2(y.float()).cpu()


# --------------------------------------------------------------------------- validation
def validate_params(
    spec: TaskSpec, params: dict[str, Any] | None, model: LoadedModel
) -> dict[str, Any]:
    """Check ``params`` against the task contract; fill defaults (task, then model config)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise TaskInputError(f"unknown parameter(s) for {spec.name}: {unknown}")
    model_defaults = model.config.get("sampling", {}).get(spec.name, {})
    out: dict[str, Any] = {}
    for name, p in spec.params.items():
        if name in params:
            out[name] = p.coerce(name, params[name])
        elif name in model_defaults:
            out[name] = p.coerce(name, model_defaults[name])
        elif p.default is not None:
            out[name] = p.default
    return out


def check_input(spec: TaskSpec, volume: Volume, model: LoadedModel) -> None:
    """Raise :class:`TaskInputError` unless volume and model satisfy the task contract."""
    if spec.name not in model.tasks:
        raise TaskInputError(
            f"model {model.model_id} is not made for task {spec.name} (it serves {model.tasks})"
        )
    if volume.intensity not in spec.input_intensities:
        raise TaskInputError(
            f"{spec.name} needs intensity in {[i.value for i in spec.input_intensities]}, "
            f"got {volume.intensity.value}"
        )
    data = volume.data
    if data.dtype.kind != "f":
        raise TaskInputError(f"volume data must be floating point, got {data.dtype}")
    _, y, x = data.shape
    if data.shape[0] < 1:
        raise TaskInputError("volume has no slices")
    for n, v in (("rows", y), ("columns", x)):
        if v < spec.min_size:  # other sizes are padded to a multiple (engine.conditioning)
            raise TaskInputError(f"{spec.name}: {n}={v} must be >= {spec.min_size}")
    if not np.all(np.isfinite(data)):
        raise TaskInputError("volume contains NaN or infinite values")
    norm_in = model.config["normalisation"]["input"]["kind"]
    is_ct = volume.intensity == Intensity.HU
    if (norm_in == "hu") != is_ct:
        raise TaskInputError(
            f"model {model.model_id} expects {'CT (HU)' if norm_in == 'hu' else 'MR'} input, "
            f"got {volume.intensity.value}"
        )


# --------------------------------------------------------------------------- task runners
def _threshold(params: dict[str, Any]) -> float | None:
    p = params.get("threshold_percentile", 0.0)
    return None if not p else float(p)


def _guide_sigma(params: dict[str, Any], vol: Volume) -> tuple[float, float] | None:
    """``keep_sigma_mm`` in pixels (rows, columns) of ``vol``; None when off."""
    keep = float(params.get("keep_sigma_mm") or 0.0)
    return (keep / vol.spacing[1], keep / vol.spacing[2]) if keep > 0 else None


def _restore(spec: TaskSpec, model: LoadedModel, vol: Volume, params: dict[str, Any], seed: int,
             opts: RunOptions) -> _Run:
    norm = model.config["normalisation"]
    x, state = normalise(vol.data, norm["input"])
    t = torch.from_numpy(x)[:, None]
    steps = 1 if model.objective == "regression" else int(params["steps"])
    t_hi = float(model.config.get("train_t_max", 1.0))
    if model.objective != "regression" and float(params["strength"]) > t_hi + 1e-9:
        raise TaskInputError(
            f"strength {params['strength']} is above {model.model_id}'s train_t_max {t_hi} "
            "(noise levels the model never saw)"
        )
    seeds = _sample_seeds(model, params, seed)
    frames = _sample_frames(model, params, len(seeds))
    y = _predict_mean(
        model,
        t,
        t,
        seeds=seeds,
        frames=frames,
        start=float(params["strength"]),
        steps=steps,
        opts=opts,
        threshold=_threshold(params),
        ensemble=_ensemble(model, params),
        guide_sigma=_guide_sigma(params, vol),
    )
    out_spec = norm.get("output", norm["input"])
    data = denormalise(y[:, 0].numpy(), out_spec, state)
    return _Run([Volume(data, vol.spacing, vol.intensity)], steps,
                {"normalisation_scale": state["scale"], **_seeds_record(seeds, frames)})


def _ct_to_mr(spec: TaskSpec, model: LoadedModel, vol: Volume, params: dict[str, Any], seed: int,
              opts: RunOptions) -> _Run:
    norm = model.config["normalisation"]
    names = list(model.config["io"]["target_names"])
    target = params["target"]
    if target not in names:
        raise TaskInputError(f"model {model.model_id} synthesises {names}, not {target!r}")
    x, _ = normalise(vol.data, norm["input"])
    t = torch.from_numpy(x)[:, None]
    steps = 1 if model.objective == "regression" else int(params["steps"])
    seeds = _sample_seeds(model, params, seed)
    frames = _sample_frames(model, params, len(seeds))
    y = _predict_mean(model, t, None, seeds=seeds, frames=frames, start=1.0, steps=steps, opts=opts,
                      threshold=_threshold(params), ensemble=_ensemble(model, params))
    ch = names.index(target)
    out_spec = norm["output"][target]
    data = denormalise(y[:, ch].numpy(), out_spec, {"scale": float(out_spec["scale"])})
    # output contract: MR magnitude is non-negative; the network undershoots 0 around air
    # (shipped ct-to-mr-wreg: down to -77 on the 512 px abdomen phantom), clamped here
    data = np.maximum(data, 0.0).astype(np.float32, copy=False)
    intensity = Intensity.MR_T1W if target == "t1w" else Intensity.MR_T2W
    return _Run(
        [Volume(data, vol.spacing, intensity)],
        steps,
        {"target": target, **_seeds_record(seeds, frames)},
    )


def _augment(spec: TaskSpec, model: LoadedModel, vol: Volume, params: dict[str, Any], seed: int,
             opts: RunOptions) -> _Run:
    if model.objective != "diffusion":
        raise TaskInputError("augmentation needs a diffusion model (a regressor has no variants)")
    norm = model.config["normalisation"]
    x, state = normalise(vol.data, norm["input"])
    t = torch.from_numpy(x)[:, None]
    out_spec = norm.get("output", norm["input"])
    guide = _guide_sigma(params, vol)
    outs = []
    seeds = [
        int(s)
        for s in np.random.SeedSequence(seed).generate_state(int(params["n"]), dtype=np.uint32)
    ]
    for s in seeds:
        y = _predict(
            model,
            t,
            t,
            start=float(params["strength"]),
            steps=int(params["steps"]),
            seed=s,
            opts=opts,
            threshold=_threshold(params),
            drop_condition=True,
            guide_sigma=guide,
        )
        outs.append(
            Volume(denormalise(y[:, 0].numpy(), out_spec, state), vol.spacing, vol.intensity)
        )
    return _Run(outs, int(params["steps"]), {"variant_seeds": seeds})


_STRENGTH_HELP = (
    "start time of the flow (fraction of T); 1 = from pure noise conditioned on the received "
    "image; at most the model's train_t_max"
)
_THR = ParamSpec(
    float, 0.995, 0.0, 1.0, help="dynamic-threshold percentile of |x0| per slice; 0 = off"
)
_KEEP_RESTORE = ParamSpec(
    float,
    None,
    0.0,
    50.0,
    help="low-frequency fidelity: the output keeps the received image's Gaussian "
    "low-pass of this sigma (mm), which a regressor shrinks at low-contrast "
    "lesions; a regressor applies it once, a diffusion model at every step "
    "(ILVR); default from the model config, else 0 = off",
)
_ENS = ParamSpec(int, None, 1, 8, choices=(1, 2, 4, 8),
                 help="regression models: average over this many flips / rotations of the slice "
                      "(1 = off; default from the model config, else 1); cost x ensemble")
_SAMPLES = ParamSpec(
    int,
    None,
    1,
    8,
    help="diffusion models: the output is the mean of this many posterior samples "
    "(each its own noise; 1 = one sample; default from the model config, else 1); "
    "cost x samples",
)
_SAMPLE_TRANSFORMS = ParamSpec(
    str,
    None,
    choices=("none", "flips"),
    help="diffusion models with samples > 1: 'flips' runs sample j on the "
    "slices flipped left-right / rotated 180 degrees / both (in turn) and "
    "turns its output back, so the mean also averages orientation errors "
    "(no extra cost); default from the model config, else 'none'",
)

_RECON_PARAMS = {
    "steps": ParamSpec(int, 1, 1, 8, help="flow steps from the partially noised received image"),
    "strength": ParamSpec(float, 0.3, 0.002, 1.0, help=_STRENGTH_HELP),
    "threshold_percentile": _THR,
    "samples": _SAMPLES,
    "sample_transforms": _SAMPLE_TRANSFORMS,
}

TASKS: dict[str, TaskSpec] = {  # keyed by TaskName (a StrEnum: equal to its value)
    TaskName.CT_DENOISE: TaskSpec(
        TaskName.CT_DENOISE,
        "Low-dose CT restoration (HU in, HU out)",
        (Intensity.HU,),
        {
            "steps": ParamSpec(int, 2, 1, 8, help="flow steps from the (partially) noised start"),
            "strength": ParamSpec(float, 0.3, 0.002, 1.0, help=_STRENGTH_HELP),
            "threshold_percentile": _THR,
            "ensemble": _ENS,
            "samples": _SAMPLES,
            "sample_transforms": _SAMPLE_TRANSFORMS,
            "keep_sigma_mm": _KEEP_RESTORE,
        },
        _restore,
        contract={"output_intensity": "HU"},
    ),
    TaskName.MR_DENOISE: TaskSpec(
        TaskName.MR_DENOISE,
        "MR restoration of Rician noise (arbitrary units, per-volume normalisation)",
        MR_KINDS,
        {
            "steps": ParamSpec(int, 2, 1, 8, help="flow steps from the (partially) noised start"),
            "strength": ParamSpec(float, 0.3, 0.002, 1.0, help=_STRENGTH_HELP),
            "threshold_percentile": _THR,
            "ensemble": _ENS,
            "samples": _SAMPLES,
            "sample_transforms": _SAMPLE_TRANSFORMS,
            "keep_sigma_mm": _KEEP_RESTORE,
        },
        _restore,
        contract={"output_intensity": "same as input"},
    ),
    TaskName.CT_TO_MR: TaskSpec(
        TaskName.CT_TO_MR,
        "CT (HU) to T1-weighted or T2-weighted MR synthesis",
        (Intensity.HU,),
        {
            "target": ParamSpec(str, "t1w", choices=("t1w", "t2w")),
            "steps": ParamSpec(int, 6, 1, 16, help="flow steps from pure noise (6-8 recommended)"),
            "threshold_percentile": _THR,
            "ensemble": _ENS,
            "samples": _SAMPLES,
            "sample_transforms": _SAMPLE_TRANSFORMS,
        },
        _ct_to_mr,
        contract={
            "output_intensity": "MR_T1W or MR_T2W in the phantom's arbitrary units, "
            ">= 0 (magnitude; negative network output clamped to 0)"
        },
    ),
    TaskName.AUGMENT: TaskSpec(
        TaskName.AUGMENT,
        "N plausible variants of a slice stack (partial noising + few denoising steps)",
        (Intensity.HU, *MR_KINDS),
        {
            "n": ParamSpec(int, 4, 1, 32, help="number of variants"),
            "strength": ParamSpec(
                float, 0.35, 0.05, 0.6, help="partial-noising strength (start time)"
            ),
            "steps": ParamSpec(int, 4, 1, 8, help="denoising steps (3-5 recommended)"),
            "keep_sigma_mm": ParamSpec(
                float,
                0.0,
                0.0,
                50.0,
                help="ILVR guidance: at every step the variant keeps the received "
                "image's Gaussian low-pass of this sigma (mm), so anatomy coarser "
                "than ~2 sigma is the received anatomy; 0 = off",
            ),
            "threshold_percentile": _THR,
        },
        _augment,
        contract={"output_intensity": "same as input", "outputs": "n volumes"},
    ),
    # reconstruction tasks, served by ControlNet adapters on a frozen base (engine.adapters)
    TaskName.CT_SPARSE_VIEW: TaskSpec(
        TaskName.CT_SPARSE_VIEW,
        "Sparse-view CT streak removal (FBP from 60-90 views in, HU out)",
        (Intensity.HU,),
        _RECON_PARAMS,
        _restore,
        contract={"output_intensity": "HU"},
    ),
    TaskName.MR_UNDERSAMPLED: TaskSpec(
        TaskName.MR_UNDERSAMPLED,
        "MR from 4x / 8x Cartesian undersampled k-space (zero-filled magnitude in)",
        MR_KINDS,
        _RECON_PARAMS,
        _restore,
        contract={"output_intensity": "same as input"},
    ),
}


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TaskInputError("CUDA requested but not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise TaskInputError(f"unknown device {device!r}")
    return device


CPU_BATCH_PIXELS = 512 * 512


def default_batch_slices(device: str, rows: int, columns: int) -> int:
    """Slices per forward pass when the settings leave it unset.

    On the CPU a UNet forward is bound by cache, not arithmetic, so a batch holds about one
    512 x 512 slice's worth of pixels (:data:`CPU_BATCH_PIXELS`): 1 slice at 512 px, 4 at 256 px.
    Measured with 2 threads on the AMD EPYC bench VM: at 512 px batches of 4 / 8 took 1.3-2x
    the time per slice of one slice at a time, at 256 px batches of 2-4 were the fastest
    (bench/results/engine_speed.md). On CUDA 8 slices, to fill the device.
    """
    if device != "cpu":
        return 8
    return max(1, CPU_BATCH_PIXELS // max(1, rows * columns))


def execute(
    task: TaskName | str,
    volume: Volume,
    *,
    model: LoadedModel,
    params: dict[str, Any] | None,
    seed: int,
    device: str | None = None,
    options: Any = None,
) -> TaskResult:
    """Validate and run ``task`` (see :func:`engine.api.run_task`)."""
    spec = TASKS.get(task)
    if spec is None:
        raise TaskInputError(f"unknown task {task!r}; known: {[str(t) for t in sorted(TASKS)]}")
    task = str(spec.name)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise TaskInputError("seed must be a non-negative integer")
    check_input(spec, volume, model)
    p = validate_params(spec, params, model)
    dev = resolve_device(device if device is not None else getattr(options, "device", None))
    opts = RunOptions(
        device=dev,
        batch_slices=int(getattr(options, "batch_slices", None)
                         or default_batch_slices(dev, *volume.data.shape[1:])),
        bf16_on_gpu=bool(getattr(options, "bf16_on_gpu", True)),
        threads=int(getattr(options, "threads", 0)),
    )
    if opts.threads > 0 and torch.get_num_threads() != opts.threads:
        torch.set_num_threads(opts.threads)
    t0 = time.perf_counter()
    # the network sees the field of view with air / padding normalised (engine.conditioning);
    # its outputs are put back around it
    cond = condition(volume, task, spec.size_multiple)
    run = spec.run(spec, model, Volume(cond.data, volume.spacing, volume.intensity), p,
                   int(seed), opts)
    run.outputs = [restore(o, volume, cond) for o in run.outputs]
    seconds = time.perf_counter() - t0
    log.info(
        "task %s model %s: %d slice(s) in %.2f s on %s",
        task,
        model.model_id,
        volume.data.shape[0],
        seconds,
        dev,
    )
    prov = Provenance(
        task=task,
        model_id=model.model_id,
        model_version=model.version,
        weights_sha256=model.weights_sha256,
        parameters=p,
        seed=int(seed),
        device=dev,
        steps=run.steps,
        seconds=seconds,
        extra={
            "objective": model.objective,
            "n_slices": int(volume.data.shape[0]),
            "batch_slices": opts.batch_slices,
            "dtype": "bfloat16" if dev.startswith("cuda") and opts.bf16_on_gpu else "float32",
            **({"base": model.config["base"]} if "base" in model.config else {}),
            "conditioning": cond.record(),
            **run.extra,
        },
    )
    return TaskResult(outputs=run.outputs, provenance=prov)
