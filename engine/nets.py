"""Model builders (MONAI) and the few-step sampling loop, kept apart.

Three separate pieces:

* **model**: :func:`build_unet` builds a MONAI ``DiffusionModelUNet`` (2-D) from a JSON-able
  config. Conditioning is by channel concatenation: ``in_channels`` = noisy target sub-bands
  + condition sub-bands (the received slice and its 2.5D neighbours, all Haar-transformed).
* **noise process**: :func:`build_scheduler` builds MONAI's ``RFlowScheduler`` (rectified
  flow: ``x_t = (1 - t/T) x0 + (t/T) eps``, the network predicts the velocity
  ``v = x0 - eps``, or, for models with ``prediction = "x0"``, the clean sample ``x0`` from
  which the sampler derives the velocity); training forwards go through MONAI's
  ``DiffusionInferer`` in ``concat`` mode (:func:`training_prediction`).
* **sampling loop**: :func:`rflow_sample` integrates the flow with Euler steps from any start
  time (1.0 = pure noise; < 1.0 = start from a partially noised image as in SDEdit, which is
  how restoration and augmentation start from the received image) and applies a pluggable
  clean-sample transform at every step, used for Imagen's dynamic thresholding
  (:func:`dynamic_threshold`). The step itself is MONAI's ``RFlowScheduler.step``.

The same UNet can be trained as a one-step regressor (objective ``"regression"``): the noisy
target slot is filled with zeros, the timestep is fixed at ``T`` and the network output is
the clean sample itself (:func:`regression_predict`).

References
----------
X. Liu et al., "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow", ICLR 2023.  C. Saharia et al., "Photorealistic Text-to-Image Diffusion
Models with Deep Language Understanding" (Imagen; dynamic thresholding), NeurIPS 2022.
C. Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations", ICLR 2022.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import RFlowScheduler

log = logging.getLogger(__name__)

__all__ = [
    "PREDICTIONS",
    "build_scheduler",
    "build_unet",
    "count_parameters",
    "dynamic_threshold",
    "in_out_channels",
    "regression_predict",
    "rflow_sample",
    "training_prediction",
]

SUBBANDS_PER_LEVEL = 4
# what a diffusion network outputs (config key ``prediction``; absent = "velocity")
PREDICTIONS = ("velocity", "x0")


def in_out_channels(io: dict[str, Any]) -> tuple[int, int]:
    """Network channels from the I/O section of a model config.

    ``io`` keys: ``target_channels`` (image channels produced, e.g. 1 for CT, 2 for T1w+T2w),
    ``cond_channels`` (image channels of the condition per slice), ``context_slices``
    (neighbours on EACH side used as 2.5D context; 1 -> 3 slices).
    """
    k = SUBBANDS_PER_LEVEL
    n_ctx = 2 * int(io.get("context_slices", 0)) + 1
    out_ch = k * int(io["target_channels"])
    in_ch = out_ch + k * int(io["cond_channels"]) * n_ctx
    return in_ch, out_ch


def build_unet(config: dict[str, Any]) -> DiffusionModelUNet:
    """A 2-D MONAI ``DiffusionModelUNet`` from ``config["architecture"]`` and ``config["io"]``.

    Parameters
    ----------
    config : dict
        ``architecture``: ``channels`` (list), ``num_res_blocks`` (int or list),
        ``attention_levels`` (list of bool), ``norm_num_groups``, optional
        ``num_head_channels``; ``io``: see :func:`in_out_channels`.
    """
    arch = config["architecture"]
    in_ch, out_ch = in_out_channels(config["io"])
    channels = tuple(int(c) for c in arch["channels"])
    attention = tuple(bool(a) for a in arch.get("attention_levels", [False] * len(channels)))
    nrb = arch.get("num_res_blocks", 1)
    nrb = (
        tuple(int(n) for n in nrb)
        if isinstance(nrb, (list, tuple))
        else (int(nrb),) * len(channels)
    )
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=in_ch,
        out_channels=out_ch,
        num_res_blocks=nrb,
        channels=channels,
        attention_levels=attention,
        norm_num_groups=int(arch.get("norm_num_groups", 8)),
        num_head_channels=int(arch.get("num_head_channels", channels[-1])),
    )


def build_scheduler(config: dict[str, Any]) -> RFlowScheduler:
    """MONAI ``RFlowScheduler`` from ``config["scheduler"]`` (defaults: T = 1000, uniform t)."""
    sch = config.get("scheduler", {})
    kind = sch.get("kind", "RFlowScheduler")
    if kind != "RFlowScheduler":
        raise ValueError(f"unsupported scheduler kind {kind!r}")
    return RFlowScheduler(
        num_train_timesteps=int(sch.get("num_train_timesteps", 1000)),
        use_discrete_timesteps=True,
        sample_method=str(sch.get("sample_method", "uniform")),
        loc=float(sch.get("loc", 0.0)),
        scale=float(sch.get("scale", 1.0)),
        use_timestep_transform=False,
    )


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def training_prediction(
    net: torch.nn.Module,
    scheduler: RFlowScheduler,
    x0: torch.Tensor,
    cond: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Velocity prediction for a training step, through MONAI's ``DiffusionInferer`` (concat).

    The regression target is ``x0 - noise`` (MONAI's rectified-flow convention).
    """
    inferer = DiffusionInferer(scheduler)
    return inferer(
        inputs=x0,
        # MONAI annotates diffusion_model as DiffusionModelUNet; any module with that
        # forward(x, timesteps, context) works, and ours is one (build_unet)
        diffusion_model=net,  # type: ignore[arg-type]
        noise=noise,
        timesteps=timesteps,
        condition=cond,
        mode="concat",
    )


def regression_predict(
    net: torch.nn.Module, cond: torch.Tensor, out_channels: int, t_max: int
) -> torch.Tensor:
    """One-step regressor: same UNet, zero target slot, timestep fixed at ``t_max``."""
    b, _, h, w = cond.shape
    slot = torch.zeros(b, out_channels, h, w, dtype=cond.dtype, device=cond.device)
    t = torch.full((b,), t_max, dtype=torch.long, device=cond.device)
    return net(x=torch.cat([slot, cond], dim=1), timesteps=t)


def dynamic_threshold(x0: torch.Tensor, percentile: float, floor: float) -> torch.Tensor:
    """Imagen dynamic thresholding, clip form, per sample.

    ``s = max(floor, quantile(|x0|, percentile))`` over each sample, then ``x0`` is clipped
    to ``[-s, s]``. Imagen additionally divides by ``s`` because its data live in [-1, 1];
    we do NOT rescale, since our intensities are physical (HU / 1000) and a rescale would
    change HU. ``floor`` is the nominal range of the normalised data (1.0).
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError("percentile must be in (0, 1]")
    flat = x0.detach().reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, percentile, dim=1).clamp_min(floor).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s)


def lowpass(x: torch.Tensor, sigma_px: tuple[float, float]) -> torch.Tensor:
    """Gaussian low-pass of ``(B, C, H, W)`` images, ``sigma_px`` = (rows, columns) in pixels,
    the border pixels repeated outwards (MONAI ``separable_filtering``)."""
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering

    kernels = []
    for s in sigma_px:
        k = gaussian_1d(torch.tensor(float(s)), truncated=4.0).to(x)
        kernels.append(k / k.sum())  # MONAI's truncated kernel sums to 1 - 1e-4: keep the mean
    return separable_filtering(x, kernels, mode="replicate")


def ilvr(
    x0: torch.Tensor, reference_low: torch.Tensor | float, sigma_px: tuple[float, float]
) -> torch.Tensor:
    """ILVR guidance (Choi et al., ICCV 2021, "Iterative Latent Variable Refinement"), on the
    predicted clean image: its low-pass is replaced by the reference's, ``x0 - lp(x0) +
    lp(ref)`` (``reference_low`` = ``lp(ref)``, computed once). Structures coarser than the
    filter come from the reference; finer ones from the model."""
    return x0 - lowpass(x0, sigma_px) + reference_low


def rflow_sample(
    net: torch.nn.Module,
    scheduler: RFlowScheduler,
    cond: torch.Tensor,
    x_start: torch.Tensor,
    start: float,
    steps: int,
    x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prediction: str = "velocity",
) -> torch.Tensor:
    """Few-step Euler integration of the rectified flow from time ``start`` to 0.

    Parameters
    ----------
    net, scheduler
        velocity UNet and MONAI ``RFlowScheduler``.
    cond : torch.Tensor
        condition channels, concatenated after the sample (concat conditioning).
    x_start : torch.Tensor
        the sample at time ``start``: pure noise for ``start == 1`` or
        ``scheduler.add_noise(image, noise, start*T)`` to start from an image.
    start : float
        start time as a fraction of ``T`` in (0, 1].
    steps : int
        number of network evaluations; the time grid is uniform from ``start*T`` to 0.
    x0_transform : callable, optional
        applied to the predicted clean sample at every step (dynamic thresholding); the
        velocity is then recomputed from the transformed clean sample before MONAI's step.
    prediction : str
        what the network outputs: ``"velocity"`` (``x0 - eps``, MONAI's convention) or
        ``"x0"`` (the clean sample; the velocity of the step is ``(x0 - x_t) / tau``). An
        x0-predicting network's first step from pure noise is its MMSE estimate, i.e. the
        one-step regressor; later steps refine it from the re-noised sample.

    Returns
    -------
    torch.Tensor
        the sample at time 0.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not 0.0 < start <= 1.0:
        raise ValueError("start must be in (0, 1]")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    t_total = scheduler.num_train_timesteps
    grid = torch.linspace(start * t_total, 0.0, steps + 1).round().long().tolist()
    scheduler.num_inference_steps = steps  # MONAI's step() checks this attribute
    x = x_start
    b = x.shape[0]
    for i in range(steps):
        t, t_next = int(grid[i]), int(grid[i + 1])
        if t <= t_next:
            continue
        tt = torch.full((b,), t, dtype=torch.long, device=x.device)
        out = net(x=torch.cat([x, cond], dim=1), timesteps=tt).to(x.dtype)
        tau = t / t_total
        if prediction == "x0":
            x0 = out if x0_transform is None else x0_transform(out)
            v = (x0 - x) / tau
        else:
            v = out
            if x0_transform is not None:
                x0 = x0_transform(x + v * tau)
                v = (x0 - x) / tau
        x, _ = scheduler.step(v, t, x, t_next)
    return x
