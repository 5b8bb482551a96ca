"""ControlNet adapters: one frozen base diffusion model, one small trainable encoder per task.

An adapter folder holds a MONAI ``ControlNet`` (a trainable copy of the base
``DiffusionModelUNet``'s encoder and middle block, fed with the task's condition through a
conditioning embedding and zero convolutions; Zhang et al., ICCV 2023) as ``model.safetensors``,
its ``config.json`` and card. The base stays frozen and is loaded from its own folder; the
adapter's config records the base it was trained on (``base``: model id, version and the
SHA-256 of the base weights), and :func:`load_adapter` refuses any other base (the model gate
does the same one level up, on the manifests).

Both run in the engine's wavelet domain (one level of Haar sub-bands, engine.wavelet): the
base sees the noisy target sub-bands with its condition slots zeroed (the base is the
augmentation model, trained with the condition always dropped), the ControlNet sees the same
input plus the 2.5D condition sub-bands (received slice and neighbours) through its
conditioning embedding, and adds its residuals to the base's skip connections and middle
block. The combined network has the same call signature and channel layout as a
concat-conditioned engine UNet, so the restoration runner of :mod:`engine.tasks` runs it
unchanged (x0 prediction, SDEdit from the received image partially noised to ``strength``).
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from monai.networks.nets import ControlNet

from engine.models import LoadedModel, ModelLoadError, load_frozen, sha256_hex
from engine.nets import count_parameters, in_out_channels

log = logging.getLogger(__name__)

__all__ = ["ADAPTER_KIND", "ControlledUNet", "base_record", "build_controlnet", "is_adapter",
           "load_adapter", "load_adapter_dir", "load_model_or_adapter_dir"]

#: ``config["kind"]`` of an adapter folder
ADAPTER_KIND = "controlnet_adapter"
#: keys an adapter config needs besides the usual model keys
ADAPTER_KEYS = ("base", "controlnet", "tasks", "io", "normalisation")
#: base config keys an adapter inherits (the network and noise process are the base's)
INHERITED = ("architecture", "objective", "prediction", "scheduler", "train_t_max")


def is_adapter(config: dict[str, Any]) -> bool:
    return config.get("kind") == ADAPTER_KIND


def base_record(base: LoadedModel) -> dict[str, str]:
    """What an adapter records about its base (config ``base``)."""
    return {"model_id": base.model_id, "version": base.version,
            "weights_sha256": base.weights_sha256}


def build_controlnet(base_config: dict[str, Any], adapter_config: dict[str, Any]) -> ControlNet:
    """A ControlNet whose encoder matches the base UNet (architecture of ``base_config``); its
    conditioning embedding takes the adapter's condition sub-bands at the sub-band resolution
    (``controlnet.embedding_channels``: one entry = no downsampling)."""
    arch = base_config["architecture"]
    in_ch, out_ch = in_out_channels(base_config["io"])
    channels = tuple(int(c) for c in arch["channels"])
    nrb = arch.get("num_res_blocks", 1)
    nrb_t = (tuple(int(n) for n in nrb) if isinstance(nrb, (list, tuple))
             else (int(nrb),) * len(channels))
    a_in, a_out = in_out_channels(adapter_config["io"])
    if a_out != out_ch:
        raise ModelLoadError(f"adapter target sub-bands {a_out} != base's {out_ch}")
    emb = tuple(int(c) for c in adapter_config["controlnet"].get("embedding_channels", [16]))
    return ControlNet(
        spatial_dims=2,
        in_channels=in_ch,
        num_res_blocks=nrb_t,
        channels=channels,
        attention_levels=tuple(bool(a) for a in arch.get("attention_levels",
                                                         [False] * len(channels))),
        norm_num_groups=int(arch.get("norm_num_groups", 8)),
        num_head_channels=int(arch.get("num_head_channels", channels[-1])),
        conditioning_embedding_in_channels=a_in - a_out,
        conditioning_embedding_num_channels=emb,
    )


class ControlledUNet(torch.nn.Module):
    """Frozen base UNet + ControlNet, called like a concat-conditioned engine UNet:
    ``x = cat(noisy target sub-bands, condition sub-bands)``."""

    def __init__(self, base: torch.nn.Module, controlnet: ControlNet, target_channels: int,
                 base_in_channels: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.controlnet = controlnet
        self.target_channels = target_channels
        self.base_in_channels = base_in_channels
        self.scale = scale

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        noisy, cond = x[:, :self.target_channels], x[:, self.target_channels:]
        pad = self.base_in_channels - self.target_channels
        base_in = torch.cat([noisy, noisy.new_zeros(noisy.shape[0], pad, *noisy.shape[2:])], 1)
        down, mid = self.controlnet(base_in, timesteps, controlnet_cond=cond,
                                    conditioning_scale=self.scale)
        out: torch.Tensor = self.base(base_in, timesteps,
                                      down_block_additional_residuals=tuple(down),
                                      mid_block_additional_residual=mid)
        return out


def merged_config(adapter_config: dict[str, Any], base: LoadedModel) -> dict[str, Any]:
    """The adapter's config with the network / noise-process keys of its base."""
    cfg = copy.deepcopy(adapter_config)
    for k in INHERITED:
        if k in base.config:
            cfg[k] = copy.deepcopy(base.config[k])
    cfg["objective"] = "diffusion"
    return cfg


def check_base(adapter_config: dict[str, Any], base: LoadedModel) -> None:
    """Refuse a base other than the one the adapter was trained on."""
    rec = adapter_config.get("base")
    if not isinstance(rec, dict) or "weights_sha256" not in rec:
        raise ModelLoadError("adapter config does not record its base (base.weights_sha256)")
    if str(rec["weights_sha256"]).lower() != base.weights_sha256:
        raise ModelLoadError(
            f"adapter {adapter_config.get('model_id')} was trained on base "
            f"{rec.get('model_id')} {rec.get('version')} (weights {rec['weights_sha256'][:16]}), "
            f"not on {base.model_id} {base.version} (weights {base.weights_sha256[:16]})")
    if base.objective != "diffusion" or base.config.get("prediction") != "x0":
        raise ModelLoadError(f"base {base.model_id} is not an x0-prediction diffusion model")


def load_adapter(config: dict[str, Any], weights: bytes, weights_sha256: str,
                 base: LoadedModel) -> LoadedModel:
    """An adapter (``config.json`` + verified safetensors bytes) on its loaded, frozen base.

    Raises
    ------
    ModelLoadError
        digest mismatch, not an adapter config, a base other than the recorded one, or
        tensors that do not fit the ControlNet.
    """
    digest = sha256_hex(weights)
    if digest != weights_sha256.lower():
        raise ModelLoadError("weights SHA-256 does not match the verified digest")
    if not is_adapter(config):
        raise ModelLoadError(f"config kind {config.get('kind')!r} is not {ADAPTER_KIND!r}")
    missing = [k for k in ADAPTER_KEYS if k not in config]
    if missing:
        raise ModelLoadError(f"adapter config lacks {missing}")
    check_base(config, base)
    cn = load_frozen(build_controlnet(base.config, config), weights, "the ControlNet")
    in_ch, out_ch = in_out_channels(base.config["io"])
    net = ControlledUNet(base.net, cn, out_ch, in_ch,
                         float(config["controlnet"].get("conditioning_scale", 1.0)))
    log.info("loaded adapter %s %s on base %s %s (%d adapter parameters)", config.get("model_id"),
             config.get("version"), base.model_id, base.version, count_parameters(cn))
    return LoadedModel(merged_config(config, base), net, digest,
                       count_parameters(cn) + base.n_parameters)


def load_adapter_dir(path: Any, base_path: Any) -> LoadedModel:
    """An adapter folder on the base folder, from disk (tests, training, evaluation; the node
    goes through the model gate, which checks both manifests first)."""
    import json
    from pathlib import Path

    from engine.models import load_model_dir

    base = load_model_dir(base_path)
    config = json.loads((Path(path) / "config.json").read_text())
    weights = (Path(path) / "model.safetensors").read_bytes()
    return load_adapter(config, weights, sha256_hex(weights), base)


def load_model_or_adapter_dir(path: Any) -> LoadedModel:
    """A model folder from disk, or an adapter folder on its base, found beside it by the
    base's recorded model id (in the folder above, or the one above that:
    ``weights/adapters/X`` -> ``weights/BASE``); evaluation and benchmarks (the node goes
    through the model gate)."""
    import json
    from pathlib import Path

    from engine.models import load_model_dir

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if not is_adapter(config):
        return load_model_dir(path)
    base_id = str((config.get("base") or {}).get("model_id", ""))
    for root in (path.parent, path.parent.parent):
        if base_id and (root / base_id / "config.json").is_file():
            return load_adapter_dir(path, root / base_id)
    raise ModelLoadError(f"the base {base_id!r} of adapter {path} is not beside it")
