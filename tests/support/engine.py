"""Tiny seeded engine models and toy training data for tests (MONAI's habit: 8 channels,
small inputs), so no test depends on the shipped weights unless it means to."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TINY_ARCH", "approved_tiny_model", "tiny_adapter_dir", "tiny_base_dir", "tiny_model",
           "tiny_model_dir", "toy_data"]

#: the smallest architecture the engine builds: 2 levels of 8 channels, Haar 1 level
TINY_ARCH: dict[str, Any] = {
    "channels": [8, 8], "num_res_blocks": 1, "attention_levels": [False, False],
    "norm_num_groups": 4, "wavelet": {"kind": "haar", "levels": 1},
}


def tiny_model(task: str, objective: str = "diffusion", seed: int = 0) -> Any:
    """An untrained, seeded :class:`engine.models.LoadedModel` for ``task``."""
    from engine.models import load_model, sha256_hex
    from engine.research.train import TrainConfig, initial_model

    cfg, weights = initial_model(TrainConfig(task=task, objective=objective, seed=seed,
                                             architecture=dict(TINY_ARCH)))
    return load_model(cfg, weights, sha256_hex(weights))


def tiny_model_dir(root: Path, task: str = "ct_denoise", *, name: str | None = None,
                   manifest: bool = True) -> Path:
    """A model folder (config.json, model.safetensors, and with ``manifest`` a card and an
    unsigned manifest for the model gate) holding an untrained tiny model for ``task``."""
    from engine.research.train import TrainConfig, initial_model

    cfg, weights = initial_model(TrainConfig(task=task, architecture=dict(TINY_ARCH)))
    d = Path(root) / (name or f"tiny-{task.replace('_', '-')}")
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(weights)
    if manifest:
        from audit.modelgate import build_manifest, write_manifest

        (d / "MODEL_CARD.md").write_text("tiny untrained test model\n")
        write_manifest(d, build_manifest(d, model_id=cfg["model_id"], version=cfg["version"],
                                         task=task, intended_use="tests"))
    return d


def toy_data(n: int = 4, size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Arrays shaped like engine.research.train.prepare_data output (disc phantoms, Gaussian 'low dose')."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    ct = np.full((n, 3, size, size), -1000.0, np.float32)
    for i in range(n):
        r = size * rng.uniform(0.25, 0.45)
        ct[i][:, (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = 40.0
    ld = ct + rng.normal(0, 40, ct.shape).astype(np.float32)
    t1w = np.where(ct > -500, 600.0, 0.0).astype(np.float32)
    return {"ct": ct, "ld": ld, "nd": ct + rng.normal(0, 10, ct.shape).astype(np.float32),
            "t1w": t1w, "t2w": 0.5 * t1w, "dose": np.full(n, 0.25, np.float32),
            "seeds": np.arange(n), "kinds": np.zeros(n, np.int8), "meta": {"toy": True}}


def approved_tiny_model(models: Path, ledger: Any, key: Any, task: str = "ct_to_mr") -> Path:
    """:func:`tiny_model_dir` in ``models``, approved in the model gate by ``key`` (an
    Ed25519 private key) as approver "tester"."""
    from audit.modelgate import Approver, ModelGate

    d = tiny_model_dir(models, task)
    ModelGate(ledger, [Approver("tester", key.public_key())]).approve(d, key)
    return d


def tiny_base_dir(root: Path, *, name: str = "tiny-base", seed: int = 0,
                  manifest: bool = True) -> Path:
    """A tiny untrained x0-prediction diffusion base (the augmentation recipe: condition
    dropped), the kind of model ControlNet adapters are trained on."""
    from engine.research.train import TrainConfig, initial_model

    cfg, weights = initial_model(TrainConfig(task="ct_augment", objective="diffusion",
                                             prediction="x0", seed=seed,
                                             architecture=dict(TINY_ARCH)))
    cfg["model_id"] = name
    cfg["train_t_max"] = 0.3
    # MONAI zero-initialises the UNet's output convolution; move every weight a little so
    # that the untrained base has an output that depends on its input
    import torch
    from safetensors.torch import load, save

    g = torch.Generator().manual_seed(seed + 100)
    weights = save({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                    else v for k, v in load(weights).items()})
    d = Path(root) / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(weights)
    if manifest:
        from audit.modelgate import build_manifest, write_manifest

        (d / "MODEL_CARD.md").write_text("tiny untrained test base\n")
        write_manifest(d, build_manifest(d, model_id=name, version=cfg["version"],
                                         task="augment", intended_use="tests"))
    return d


def tiny_adapter_dir(root: Path, base_dir: Path, task: str = "ct_sparse_view", *,
                     name: str | None = None, manifest: bool = True,
                     perturb: float = 0.0) -> Path:
    """An adapter folder for ``task`` on the base in ``base_dir``: the ControlNet initialised
    from the base's encoder as training starts it (zero convolutions: the controlled network
    is then exactly the base), or with ``perturb`` > 0 every parameter moved by seeded noise
    of that SD, so the adapter changes the output."""
    import torch
    from safetensors.torch import save

    from engine.adapters import build_controlnet
    from engine.models import load_model_dir
    from engine.research.adapters import adapter_config

    base = load_model_dir(base_dir)
    name = name or f"tiny-{task.replace('_', '-')}-adapter"
    cfg = adapter_config(task, base, name, "0.1.0", {"tests": True})
    cn = build_controlnet(base.config, cfg)
    cn.load_state_dict(base.net.state_dict(), strict=False)
    state = {k: v.detach().clone().contiguous() for k, v in cn.state_dict().items()}
    if perturb:
        g = torch.Generator().manual_seed(1)
        state = {k: v + perturb * torch.randn(v.shape, generator=g) if v.is_floating_point()
                 else v for k, v in state.items()}
    d = Path(root) / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(save(state))
    if manifest:
        from audit.modelgate import build_manifest, write_manifest

        (d / "MODEL_CARD.md").write_text("tiny untrained test adapter\n")
        write_manifest(d, build_manifest(d, model_id=name, version="0.1.0", task=task,
                                         intended_use="tests", base=cfg["base"]))
    return d
