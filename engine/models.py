"""Loading models from verified bytes (safetensors only; never pickle).

The node's model gate verifies the signed manifest and passes the exact bytes it hashed;
:func:`load_model` re-hashes them, refuses a mismatch, and deserialises with
``safetensors.torch.load`` (a flat tensor map; no code execution, unlike ``torch.load``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from engine.nets import PREDICTIONS, build_scheduler, build_unet, count_parameters, in_out_channels

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "load_model_dir", "sha256_hex"]

REQUIRED_KEYS = ("model_id", "version", "tasks", "objective", "architecture", "io", "normalisation")


class ModelLoadError(ValueError):
    """The config, the bytes or their digest are not acceptable."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class LoadedModel:
    """A ready-to-run model: network in eval mode plus the config that describes it."""

    config: dict[str, Any]
    net: torch.nn.Module
    weights_sha256: str
    n_parameters: int
    _device: str = field(default="cpu", repr=False)

    @property
    def model_id(self) -> str:
        return str(self.config["model_id"])

    @property
    def version(self) -> str:
        return str(self.config["version"])

    @property
    def tasks(self) -> list[str]:
        return list(self.config["tasks"])

    @property
    def objective(self) -> str:
        return str(self.config["objective"])

    def scheduler(self):  # a fresh scheduler per run: MONAI schedulers hold sampling state
        return build_scheduler(self.config)

    def to(self, device: str) -> LoadedModel:
        if device != self._device:
            self.net.to(device)
            self._device = device
        return self


def _validate_config(config: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ModelLoadError(f"model config lacks {missing}")
    if config["objective"] not in ("diffusion", "regression"):
        raise ModelLoadError(f"unknown objective {config['objective']!r}")
    if config.get("prediction", "velocity") not in PREDICTIONS:
        raise ModelLoadError(f"unknown prediction {config['prediction']!r}; known: {PREDICTIONS}")
    in_out_channels(config["io"])  # raises KeyError on a malformed io section


def load_model(config: dict[str, Any], weights: bytes, weights_sha256: str) -> LoadedModel:
    """Build the network from ``config`` and load ``weights`` (safetensors bytes).

    Parameters
    ----------
    config : dict
        parsed ``config.json`` of the model folder.
    weights : bytes
        the content of ``model.safetensors`` exactly as verified by the model gate.
    weights_sha256 : str
        hex SHA-256 the gate verified; re-checked here so the digest recorded in the ledger
        and DICOM output is the digest of the bytes actually loaded.

    Raises
    ------
    ModelLoadError
        digest mismatch, malformed config, or tensors that do not fit the architecture.
    """
    digest = sha256_hex(weights)
    if digest != weights_sha256.lower():
        raise ModelLoadError("weights SHA-256 does not match the verified digest")
    _validate_config(config)
    net = load_frozen(build_unet(config), weights, "the architecture")
    log.info(
        "loaded model %s %s (%d parameters)",
        config["model_id"],
        config["version"],
        count_parameters(net),
    )
    return LoadedModel(copy.deepcopy(config), net, digest, count_parameters(net))


def load_frozen(net: torch.nn.Module, weights: bytes, what: str) -> Any:
    """``net`` with the safetensors ``weights`` loaded exactly, frozen for inference, in the
    channels-last (NHWC) layout: oneDNN's fast convolution layout on the CPU (conv outputs
    follow the weights' layout); the same numbers up to float rounding, 1.2-1.5x faster per
    forward on the 2-core bench machine (bench/results/engine_speed.md); on CUDA the layout
    tensor cores prefer for bf16 (not measured here: no GPU was lent). ``what`` names the
    module in the error when the weights do not fit."""
    try:
        state = st_load(weights)
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"not a safetensors file: {exc}") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights do not fit {what}: {exc}") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (torch stubs lack the keyword)
    return net


def load_model_dir(path: Path | str) -> LoadedModel:
    """Load a model folder (``config.json`` + ``model.safetensors``) from disk.

    For training, evaluation, tests and benchmarks. The node loads through the model gate,
    which verifies the signed manifest first and then calls :func:`load_model`.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    weights = (path / "model.safetensors").read_bytes()
    return load_model(config, weights, sha256_hex(weights))
