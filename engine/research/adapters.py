"""Training and evaluation of the reconstruction adapters (:mod:`engine.adapters`).

Data (held-out splits of :mod:`engine.research.phantoms`, 3 contiguous slices per phantom for
the 2.5D context, abdomen and head alternating):

* ``ct_sparse_view``: the normal-dose CT and its sparse-view version (FBP from 60 or 90 of 720
  parallel views, :func:`engine.research.degrade.sparse_view_ct`), alternating.
* ``mr_undersampled``: the phantom's T1w / T2w (alternating, with its own Rician noise at SNR
  40 as a scanner image has) and its zero-filled reconstruction from 4x or 8x Cartesian
  undersampled k-space (:func:`engine.research.degrade.mr_undersample`), alternating.
* ``ct_denoise``: the normal-dose CT and its projection-domain low-dose version at 0.25 or
  0.1 of full dose (:func:`engine.research.degrade.low_dose_ct`, the simulator the shipped
  restoration models were trained with), alternating: the same task as the shipped one-step
  regressor, as an adapter on the shared base, to compare the two.

Training: the base (an x0-prediction diffusion model in the wavelet domain, frozen) and a
ControlNet initialised from the base's encoder (MONAI's recipe: the encoder's weights, zero
convolutions to the base) learn ``E[clean | x_t, condition]`` with the base's loss (MSE to the
clean sub-bands). ``x_t = (1 - t) s + t eps`` with ``t`` uniform in ``(0, train_t_max]`` of the
base and ``s`` the degraded image (what the task starts from: SDEdit from the received image)
or, with probability ``p_clean_start``, the clean one (what later steps see). Only the
ControlNet's parameters are optimised.

``python -m engine.research.adapters train TASK --base DIR --out DIR --steps N`` and
``python -m engine.research.adapters evaluate TASK --adapter DIR --base DIR --out DIR``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from engine.adapters import ADAPTER_KIND, ControlledUNet, base_record, build_controlnet
from engine.models import LoadedModel, load_model_dir, sha256_hex
from engine.nets import count_parameters, in_out_channels
from engine.tasks import TASKS, normalise
from engine.types import Intensity, TaskName, Volume
from engine.wavelet import dwt2

log = logging.getLogger(__name__)

ADAPTER_TASKS = (TaskName.CT_SPARSE_VIEW, TaskName.MR_UNDERSAMPLED, TaskName.CT_DENOISE)
CT_ADAPTER_TASKS = (TaskName.CT_SPARSE_VIEW, TaskName.CT_DENOISE)
ADAPTER_DOSES = (0.25, 0.1)
CT_NORM = {"kind": "hu", "scale": 1000.0}
MR_NORM = {"kind": "percentile", "q": 0.995}
DEFAULT_IDS = {TaskName.CT_SPARSE_VIEW: "ct-sparse-view-cnet",
               TaskName.MR_UNDERSAMPLED: "mr-undersampled-cnet",
               TaskName.CT_DENOISE: "ct-denoise-cnet"}


def _norm(task: str) -> dict[str, Any]:
    return CT_NORM if task in CT_ADAPTER_TASKS else MR_NORM


def degrade_sample(task: str, s: Any, i: int) -> tuple[np.ndarray, np.ndarray, Intensity, str]:
    """(clean, degraded, intensity, label) for phantom sample ``s`` (index ``i`` picks the view
    count / acceleration and, for MR, the weighting)."""
    from engine.research.degrade import (
        SPARSE_VIEWS,
        low_dose_ct,
        mr_undersample,
        sparse_view_ct,
    )

    if task == TaskName.CT_DENOISE:
        dose = ADAPTER_DOSES[i % len(ADAPTER_DOSES)]
        low = low_dose_ct(s.ct_hu, float(s.spacing[1]), dose, seed=s.seed)
        return s.ct_hu, low, Intensity.HU, f"dose {dose:g}"
    if task == TaskName.CT_SPARSE_VIEW:
        views = SPARSE_VIEWS[i % len(SPARSE_VIEWS)]
        return s.ct_hu, sparse_view_ct(s.ct_hu, views), Intensity.HU, f"{views} views"
    if task == TaskName.MR_UNDERSAMPLED:
        acc = (4, 8)[i % 2]
        t1 = (i // 2) % 2 == 0
        img = s.t1w if t1 else s.t2w
        return (img, mr_undersample(img, acc, seed=s.seed), Intensity.MR_T1W if t1
                else Intensity.MR_T2W, f"{acc}x {'T1w' if t1 else 'T2w'}")
    raise ValueError(f"no adapter data recipe for task {task!r}")


def cases(task: str, split: str, n: int, size: int = 256) -> list[Any]:
    """Evaluation cases (:class:`engine.research.evaluate.Case`) of ``split``."""
    from engine.research.evaluate import Case
    from engine.research.phantoms import iter_dataset

    out = []
    for i, s in enumerate(iter_dataset(split, n, size=size, n_slices=3, kind="mixed")):  # type: ignore[arg-type]
        clean, deg, inten, label = degrade_sample(task, s, i)
        out.append(Case(f"{split}-{s.seed}-{s.kind}-{label.replace(' ', '')}",
                        Volume(deg.astype(np.float32), s.spacing, inten),
                        Volume(clean.astype(np.float32), s.spacing, inten),
                        s.labels, s.lesion_mask, {"degradation": label}))
    return out


def training_pairs(task: str, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (clean, degraded) stacks ``(n, 3, size, size)`` of the train split; MR is
    normalised by the degraded volume's 99.5th percentile, as the task does at run time."""
    from engine.research.phantoms import iter_dataset

    clean_l, deg_l = [], []
    for i, s in enumerate(iter_dataset("train", n, size=size, n_slices=3, kind="mixed")):  # type: ignore[arg-type]
        clean, deg, _, _ = degrade_sample(task, s, i)
        d, state = normalise(deg.astype(np.float32), _norm(task))
        if _norm(task)["kind"] == "hu":
            c = clean / state["scale"]
        else:
            c = 2.0 * clean / state["scale"] - 1.0
        clean_l.append(np.asarray(c, np.float32))
        deg_l.append(d)
    return torch.from_numpy(np.stack(clean_l)), torch.from_numpy(np.stack(deg_l))


def _sample_batch(clean: torch.Tensor, deg: torch.Tensor, batch: int, size: int, crop: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of (clean, degraded) crops at even offsets, flipped left-right half
    of the time (the phantoms' orientation is fixed)."""
    idx = torch.randint(0, clean.shape[0], (batch,), generator=gen)
    y0 = torch.randint(0, size - crop + 1, (1,), generator=gen).item() // 2 * 2
    x0 = torch.randint(0, size - crop + 1, (1,), generator=gen).item() // 2 * 2
    c = clean[idx, :, y0:y0 + crop, x0:x0 + crop]
    d = deg[idx, :, y0:y0 + crop, x0:x0 + crop]
    if torch.rand((), generator=gen) < 0.5:
        c, d = c.flip(-1), d.flip(-1)
    return c, d


def adapter_config(task: str, base: LoadedModel, model_id: str, version: str,
                   training: dict[str, Any]) -> dict[str, Any]:
    io = {k: base.config["io"][k] for k in ("target_channels", "cond_channels", "context_slices")}
    io["target_names"] = ["ct"] if task in CT_ADAPTER_TASKS else ["mr"]
    norm = _norm(task)
    return {
        "format": "synthnode-adapter/1",
        "kind": ADAPTER_KIND,
        "model_id": model_id,
        "version": version,
        "tasks": [str(task)],
        "objective": "diffusion",
        "base": base_record(base),
        "controlnet": {"embedding_channels": [16], "conditioning_scale": 1.0},
        "io": io,
        "normalisation": {"input": norm, "output": norm},
        "sampling": {str(task): {"steps": 1, "strength": float(base.config.get("train_t_max",
                                                                               0.3))}},
        "input_contract": {str(task): TASKS[task].describe()},
        "training": training,
    }


def train(task: str, base_dir: Path, out_dir: Path, *, steps: int = 300, batch: int = 4,
          crop: int = 128, lr: float = 2e-4, n_train: int = 16, size: int = 256, seed: int = 0,
          p_clean_start: float = 0.3, model_id: str | None = None, version: str = "0.1.0",
          device: str = "cpu", progress: Callable[[int, float], None] | None = None) -> Path:
    """Train one adapter on the frozen base; writes config.json, model.safetensors and
    MODEL_CARD.md (no manifest: ``synthnode engine package`` writes it)."""
    task = TaskName(task)
    if task not in ADAPTER_TASKS:
        raise ValueError(f"no adapter recipe for {task}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = load_model_dir(base_dir)
    if base.objective != "diffusion" or base.config.get("prediction") != "x0":
        raise ValueError("the base must be an x0-prediction diffusion model")
    t0 = time.perf_counter()
    clean, deg = training_pairs(task, n_train, size)
    data_s = time.perf_counter() - t0
    cfg = adapter_config(task, base, model_id or DEFAULT_IDS[task], version, {})
    cn = build_controlnet(base.config, cfg)
    missing = cn.load_state_dict(base.net.state_dict(), strict=False)  # the encoder's weights
    log.info("ControlNet from the base encoder; %d tensors of its own (embedding, zero convs)",
             len(missing.missing_keys))
    in_ch, out_ch = in_out_channels(base.config["io"])
    net = ControlledUNet(base.net, cn, out_ch, in_ch).to(device)
    base.net.float().to(device)
    for p in base.net.parameters():
        p.requires_grad_(False)
    cn.train()
    opt = torch.optim.AdamW(cn.parameters(), lr=lr)
    t_total = int(base.config.get("scheduler", {}).get("num_train_timesteps", 1000))
    t_max = float(base.config.get("train_t_max", 1.0))
    losses: list[float] = []
    t1 = time.perf_counter()
    for step in range(steps):
        c, d = _sample_batch(clean, deg, batch, size, crop, gen)
        target = dwt2(c[:, 1:2]).to(device)
        cond = dwt2(d).to(device)
        start = torch.where(torch.rand((batch, 1, 1, 1), generator=gen) < p_clean_start,
                            target.cpu(), dwt2(d[:, 1:2])).to(device)
        tt = (torch.rand((batch,), generator=gen) * t_max * t_total).long().clamp(1, t_total)
        tau = (tt.float() / t_total).view(-1, 1, 1, 1).to(device)
        eps = torch.randn(target.shape, generator=gen).to(device)
        x_t = (1 - tau) * start + tau * eps
        pred = net(torch.cat([x_t, cond], 1), tt.to(device))
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None and (step % 50 == 0 or step == steps - 1):
            progress(step, float(np.mean(losses[-50:])))
    train_s = time.perf_counter() - t1
    cn.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in cn.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    digest = sha256_hex((out_dir / "model.safetensors").read_bytes())
    cfg["training"] = {
        "steps": steps, "batch": batch, "crop": crop, "lr": lr, "n_train": n_train, "size": size,
        "seed": seed, "p_clean_start": p_clean_start, "device": device,
        "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
        "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
        "adapter_parameters": count_parameters(cn), "base_parameters": base.n_parameters,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    cfg["n_parameters"] = count_parameters(cn)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
    write_card(out_dir, digest)
    return out_dir


def train_regressor(task: str, base_dir: Path, out_dir: Path, *, steps: int = 800,
                    batch: int = 4, crop: int = 128, lr: float = 2e-4, n_train: int = 16,
                    size: int = 256, seed: int = 0, device: str = "cpu") -> Path:
    """Baseline: the base's UNet (all of it, warm-started from the base weights) trained as a
    one-step regressor (zero target slot, t = T, MSE to the clean sub-bands) on the same pairs,
    crops and step count as the adapter. Writes config.json + model.safetensors (a plain engine
    model for ``task``; not shipped)."""
    import copy

    from engine.nets import build_unet, regression_predict

    task = TaskName(task)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = load_model_dir(base_dir)
    clean, deg = training_pairs(task, n_train, size)
    net = build_unet(base.config)
    net.load_state_dict({k: v.float() for k, v in base.net.state_dict().items()})
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    t_total = int(base.config.get("scheduler", {}).get("num_train_timesteps", 1000))
    _, out_ch = in_out_channels(base.config["io"])
    losses: list[float] = []
    t1 = time.perf_counter()
    for _ in range(steps):
        c, d = _sample_batch(clean, deg, batch, size, crop, gen)
        pred = regression_predict(net, dwt2(d).to(device), out_ch, t_total)
        loss = torch.nn.functional.mse_loss(pred, dwt2(c[:, 1:2]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    cfg = copy.deepcopy(adapter_config(task, base, f"{DEFAULT_IDS[task]}-regressor", "0.0.1",
                                       {}))
    for k in ("kind", "base", "controlnet", "format"):
        cfg.pop(k, None)
    cfg.update({"format": "synthnode-model/1", "objective": "regression",
                "architecture": base.config["architecture"],
                "scheduler": base.config.get("scheduler", {}), "sampling": {},
                "training": {"steps": steps, "batch": batch, "crop": crop, "lr": lr,
                             "n_train": n_train, "size": size, "seed": seed,
                             "train_seconds": round(time.perf_counter() - t1, 1),
                             "loss_last_50": float(np.mean(losses[-50:])),
                             "init": f"{base.model_id} {base.version}"}})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
              str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
    return out_dir


def write_card(out_dir: Path, digest: str | None = None, metrics_md: str | None = None) -> Path:
    """MODEL_CARD.md of an adapter folder from its config (and held-out metrics, if given)."""
    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    digest = digest or sha256_hex((out_dir / "model.safetensors").read_bytes())
    tr, b, task = cfg.get("training", {}), cfg["base"], cfg["tasks"][0]
    lines = [
        f"# {cfg['model_id']} {cfg['version']} (ControlNet adapter, EXPERIMENTAL, undertrained)",
        "",
        f"Task `{task}`: {TASKS[task].description}. A MONAI ControlNet on the frozen base "
        f"`{b['model_id']}` {b['version']} (weights SHA-256 `{b['weights_sha256']}`); the "
        "adapter refuses any other base (engine.adapters.load_adapter, and the model gate on "
        "the manifests).",
        "",
        f"- adapter weights: `model.safetensors`, SHA-256 `{digest}`, "
        f"{tr.get('adapter_parameters', cfg.get('n_parameters'))} parameters "
        f"(base {tr.get('base_parameters')})",
        "- intended use: research and engineering validation of the adapter path on phantoms; "
        "not for diagnosis; outputs are synthetic",
        f"- training: {tr.get('steps')} steps, batch {tr.get('batch')}, {tr.get('crop')} px crops, "
        f"lr {tr.get('lr')}, {tr.get('n_train')} train-split phantoms x 3 slices at "
        f"{tr.get('size')} px, seed {tr.get('seed')}, {tr.get('train_seconds')} s on "
        f"{tr.get('device')} (data {tr.get('data_seconds')} s); loss {tr.get('loss_first_50')} "
        f"(first 50 steps) -> {tr.get('loss_last_50')} (last 50)",
        f"- command: `OMP_NUM_THREADS=1 nice -n 10 python -m engine.research.adapters train {task} "
        f"--base engine/weights/{b['model_id']} --out <dir> --steps {tr.get('steps')} --n-train "
        f"{tr.get('n_train')} --size {tr.get('size')} --crop {tr.get('crop')} --batch "
        f"{tr.get('batch')} --lr {tr.get('lr')} --seed {tr.get('seed')}`, then the config's "
        f"sampling defaults: {tr.get('sampling_choice', 'as trained')}",
        "- data: engine.research.adapters (sparse-view FBP from 60 / 90 of 720 parallel views, "
        "4x / 8x Cartesian undersampling with a fully sampled centre, zero-filled, or "
        "projection-domain low dose at 0.25 / 0.1 of full dose)",
        "- a minutes-long CPU run that proves the adapter path end to end; it is NOT trained "
        "to convergence and does not meet any quality aim (see the metrics below)",
        "",
        "Input contract:",
        "",
        "```json",
        json.dumps(cfg["input_contract"][task], indent=1),
        "```",
        "",
    ]
    if metrics_md:
        lines += ["## Held-out metrics", "", metrics_md.strip(), ""]
    path = out_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def tv_method(task: str, weight: float) -> Callable[[Volume], Volume]:
    """Total-variation denoising (Chambolle) of the input, per slice, in network units."""
    from skimage.restoration import denoise_tv_chambolle

    def run(v: Volume) -> Volume:
        x, state = normalise(v.data, _norm(task))
        y = np.stack([denoise_tv_chambolle(s, weight=weight) for s in x]).astype(np.float32)
        from engine.tasks import denormalise

        return Volume(denormalise(y, _norm(task), state), v.spacing, v.intensity)
    return run


def tv_weight_on_val(task: str, size: int = 256,
                     weights: tuple[float, ...] = (0.02, 0.05, 0.1)) -> float:
    """The TV baseline's weight: best mean PSNR on 2 validation cases of ``task``."""
    from engine.research.evaluate import score

    val = cases(task, "val", 2, size)
    return max(weights, key=lambda w: float(np.mean(
        [score(c, tv_method(task, w)(c.input))["psnr"] for c in val])))


def evaluate(task: str, adapter_dir: Path, base_dir: Path, out_dir: Path, n: int = 4,
             size: int = 256, tv_weights: tuple[float, ...] = (0.02, 0.05, 0.1),
             seed: int = 0, regressor_dir: Path | None = None,
             models: tuple[Path, ...] = ()) -> Path:
    """Test-split report (engine.research.evaluate): input (FBP / zero-filled / low dose), TV
    on the input (weight chosen on 2 validation cases by PSNR), for ``ct_denoise`` also NLM
    (the restoration baseline of ``synthnode engine evaluate``), the one-step regressor
    baseline, every model folder of ``models`` (e.g. the shipped model of the task), and the
    adapter."""
    from engine.adapters import load_adapter_dir
    from engine.api import run_task
    from engine.research.evaluate import model_method, run_section, write_report

    task = TaskName(task)
    best = tv_weight_on_val(task, size, tv_weights)
    model = load_adapter_dir(adapter_dir, base_dir)

    def adapter(v: Volume) -> Volume:
        return run_task(task, v, model=model, params=None, seed=seed, device="cpu").outputs[0]

    methods = {f"TV (weight {best}, chosen on val)": tv_method(task, best)}
    if task == TaskName.CT_DENOISE:
        from engine.research.baselines import nlm_ct

        nlm = nlm_ct()
        methods[f"NLM (h={nlm.h_factor} sigma)"] = nlm
    if regressor_dir is not None:
        methods["same UNet, one-step regressor (same data and steps)"] = model_method(
            regressor_dir, task, seed=seed)[0]
    for mdir in models:
        fn, desc = model_method(mdir, task, seed=seed)
        methods[f"{desc['model_id']} {desc['version']} ({desc['objective']})"] = fn
    methods[f"{model.model_id} {model.version} (adapter)"] = adapter
    test = cases(task, "test", n, size)
    sec = run_section(f"{task} (test split)", task, test, methods, out_dir,
                      description=f"{n} test phantoms x 3 slices at {size} px; "
                      + ", ".join(sorted({c.info['degradation'] for c in test})))
    return write_report([sec], out_dir, f"{task}: ControlNet adapter vs input and TV")


def sweep(task: str, adapter_dir: Path, base_dir: Path, strengths: tuple[float, ...],
          n: int = 2, size: int = 256, seed: int = 0) -> list[dict[str, float]]:
    """Mean PSNR / SSIM of the adapter on ``n`` validation cases per start ``strength`` (the
    adapter's config default is chosen with this, never on the test split)."""
    from engine.adapters import load_adapter_dir
    from engine.api import run_task
    from engine.research.evaluate import score

    model = load_adapter_dir(adapter_dir, base_dir)
    val = cases(task, "val", n, size)
    rows = []
    for s in strengths:
        sc = [score(c, run_task(task, c.input, model=model, params={"strength": s}, seed=seed,
                                device="cpu").outputs[0]) for c in val]
        rows.append({"strength": s, "psnr": float(np.mean([x["psnr"] for x in sc])),
                     "ssim": float(np.mean([x["ssim"] for x in sc]))})
    return rows


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - research entry point
    ap = argparse.ArgumentParser(prog="python -m engine.research.adapters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("task", choices=[str(x) for x in ADAPTER_TASKS])
    t.add_argument("--base", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--crop", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--n-train", type=int, default=16)
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--version", default="0.1.0")
    e = sub.add_parser("evaluate")
    e.add_argument("task", choices=[str(x) for x in ADAPTER_TASKS])
    e.add_argument("--adapter", type=Path, required=True)
    e.add_argument("--base", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--n", type=int, default=4)
    e.add_argument("--size", type=int, default=256)
    e.add_argument("--regressor", type=Path, default=None)
    e.add_argument("--model", type=Path, action="append", default=[],
                   help="another model folder evaluated beside the adapter (repeat)")
    r = sub.add_parser("train-regressor")
    r.add_argument("task", choices=[str(x) for x in ADAPTER_TASKS])
    r.add_argument("--base", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--steps", type=int, default=800)
    w = sub.add_parser("sweep")
    w.add_argument("task", choices=[str(x) for x in ADAPTER_TASKS])
    w.add_argument("--adapter", type=Path, required=True)
    w.add_argument("--base", type=Path, required=True)
    w.add_argument("--strength", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    w.add_argument("--n", type=int, default=2)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.cmd == "train":
        train(a.task, a.base, a.out, steps=a.steps, batch=a.batch, crop=a.crop, lr=a.lr,
              n_train=a.n_train, size=a.size, seed=a.seed, version=a.version,
              progress=lambda s, lo: print(f"step {s} loss {lo:.5f}", flush=True))
        print(a.out)
    elif a.cmd == "train-regressor":
        print(train_regressor(a.task, a.base, a.out, steps=a.steps))
    elif a.cmd == "sweep":
        for row in sweep(a.task, a.adapter, a.base, tuple(a.strength), n=a.n):
            print(" ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
    else:
        print(evaluate(a.task, a.adapter, a.base, a.out, n=a.n, size=a.size,
                       regressor_dir=a.regressor, models=tuple(a.model)))


if __name__ == "__main__":  # pragma: no cover
    main()
