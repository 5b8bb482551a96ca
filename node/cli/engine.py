"""``synthnode engine``: train (and evaluate) engine models."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from node.cli.common import ConfigOption, console, fail, settings_from

if TYPE_CHECKING:
    from engine.research.train import TrainConfig

log = logging.getLogger(__name__)

app = typer.Typer(no_args_is_help=True)


# -- `engine train` options (declared here, one line each in the command's signature) --------
_TASK = typer.Argument(
    ..., help="training recipe: ct_denoise | mr_denoise | ct_to_mr | ct_augment"
)
_OBJECTIVE = typer.Option(
    "diffusion", "--objective", help="diffusion | regression (one-step baseline)"
)
_STEPS = typer.Option(1500, "--steps", min=1)
_BATCH = typer.Option(8, "--batch", min=1)
_CROP = typer.Option(128, "--crop", min=16, help="training crop (px); multiple of 16")
_LR = typer.Option(2e-3, "--lr")
_SEED = typer.Option(0, "--seed", min=0)
_N_TRAIN = typer.Option(96, "--n-train", min=1, help="training phantoms (3 slices each)")
_SIZE = typer.Option(256, "--size", min=32, help="phantom size (px)")
_DATA = typer.Option(None, "--data", help="cached training data (.npz); built if missing")
_OUT = typer.Option(None, "--out", help="models folder (default: settings models_dir)")
_MODEL_ID = typer.Option(None, "--model-id")
_VERSION = typer.Option("1.0.0", "--version")
_CHANNELS = typer.Option("32,32,64,64", "--channels", help="UNet channels per level")
_EMA = typer.Option(
    None,
    "--ema-decay",
    min=0.0,
    max=1.0,
    help="EMA decay of the shipped weights (default: 0.995, window <= 10 % of the run)",
)
_MINUTES = typer.Option(None, "--minutes", help="wall-clock budget: fewer steps if needed")
_LESION_WEIGHT = typer.Option(
    0.0,
    "--lesion-weight",
    min=0.0,
    help="extra loss weight inside lesions (grown by 2 px); 0 = plain MSE",
)
_LESION_CROP = typer.Option(
    0.0, "--lesion-crop", min=0.0, max=1.0, help="probability of centring a crop on a lesion"
)
_FULLDOSE_TARGET = typer.Option(
    0.0,
    "--fulldose-target",
    min=0.0,
    max=1.0,
    help="ct_denoise, ct_augment: share of pairs with the full-dose scan as target "
    "(input = it + extra noise; the real-scan evaluation protocol)",
)
_OWN_TEXTURE = typer.Option(
    0.0,
    "--own-texture",
    min=0.0,
    max=1.0,
    help="ct_denoise: in full-dose-target pairs, share whose own noise is a "
    "synthetic correlated texture instead of the phantom's",
)
_SHARP_SHAPES = typer.Option(
    0.0,
    "--sharp-shapes",
    min=0.0,
    max=1.0,
    help="ct_denoise: share of pairs with pasted pixel-sharp shapes "
    "(air pockets, constant-HU objects)",
)
_OWN_NOISE = typer.Option(
    0.0,
    "--own-noise",
    min=0.0,
    max=1.0,
    help="mr_denoise: share of pairs whose target keeps its own noise and texture "
    "(input = it + Rician noise; the real-scan evaluation protocol)",
)
_SSIM_WEIGHT = typer.Option(
    0.0,
    "--ssim-weight",
    min=0.0,
    help="ct_to_mr regression: add this weight x (1 - SSIM) to the MSE loss",
)
_PREDICTION = typer.Option(
    "velocity",
    "--prediction",
    help="diffusion: what the network predicts, velocity (x0 - eps) or x0 (the clean "
    "sample; a regressor's weights are then a warm start via --init)",
)
_TRAIN_T_MAX = typer.Option(
    None,
    "--train-t-max",
    min=0.01,
    max=1.0,
    help="diffusion: train on t ~ U(0, this x T) (default: the task preset; "
    "1.0 to sample restoration from pure noise)",
)
_P_UNCOND = typer.Option(
    None,
    "--p-uncond",
    min=0.0,
    max=1.0,
    help="diffusion: probability of dropping the condition in training "
    "(default: the task preset's; ct_augment samples without it)",
)
_SAMPLE = typer.Option(
    [],
    "--sample",
    metavar="KEY=VALUE",
    help="diffusion: a sampling default written to the model config, e.g. "
    "steps=4, strength=1.0, threshold_percentile=0 (repeat)",
)
_INIT = typer.Option(
    None,
    "--init",
    exists=True,
    file_okay=False,
    help="initialise from this model folder's weights (same architecture)",
)
_RESUME = typer.Option(False, "--resume", help="continue from the run's last checkpoint")
_DEVICE = typer.Option(None, "--device", help="cpu | cuda | auto (default: settings)")


@app.command("train")
def train_cmd(
    task: str = _TASK,
    objective: str = _OBJECTIVE,
    steps: int = _STEPS,
    batch: int = _BATCH,
    crop: int = _CROP,
    lr: float = _LR,
    seed: int = _SEED,
    n_train: int = _N_TRAIN,
    size: int = _SIZE,
    data: Path | None = _DATA,
    out: Path | None = _OUT,
    model_id: str | None = _MODEL_ID,
    version: str = _VERSION,
    channels: str = _CHANNELS,
    ema: float | None = _EMA,
    minutes: float | None = _MINUTES,
    lesion_weight: float = _LESION_WEIGHT,
    lesion_crop: float = _LESION_CROP,
    fulldose_target: float = _FULLDOSE_TARGET,
    own_texture: float = _OWN_TEXTURE,
    sharp_shapes: float = _SHARP_SHAPES,
    own_noise: float = _OWN_NOISE,
    ssim_weight: float = _SSIM_WEIGHT,
    prediction: str = _PREDICTION,
    train_t_max: float | None = _TRAIN_T_MAX,
    p_uncond: float | None = _P_UNCOND,
    sample: list[str] = _SAMPLE,
    init: Path | None = _INIT,
    resume: bool = _RESUME,
    device: str | None = _DEVICE,
    config: Path | None = ConfigOption,
) -> None:
    """Train a model on phantoms and write <models_dir>/<model_id>/ (weights, config, card)."""
    import torch

    from engine.research.train import DEFAULT_ARCH, PRESETS, TrainConfig
    from engine.tasks import resolve_device

    settings = settings_from(config)
    if task not in PRESETS:
        fail(
            f"no training recipe for {task!r}; choose from {sorted(PRESETS)} "
            "(augment reuses the restoration models)"
        )
    if objective not in ("diffusion", "regression"):
        fail("--objective must be diffusion or regression")
    if crop % 16 or crop > size:
        fail("--crop must be a multiple of 16 and <= --size")
    sampling = _key_values("--sample", sample)
    if (sampling or prediction != "velocity" or train_t_max is not None or p_uncond is not None) \
            and objective != "diffusion":
        fail("--prediction / --train-t-max / --p-uncond / --sample apply to --objective diffusion")
    ch = [int(c) for c in channels.split(",") if c.strip()]
    arch = {**DEFAULT_ARCH, "channels": ch, "attention_levels": [False] * len(ch)}
    tc = TrainConfig(
        task=task,
        objective=objective,
        steps=steps,
        batch=batch,
        crop=crop,
        lr=lr,
        seed=seed,
        n_train=n_train,
        size=size,
        architecture=arch,
        model_id=model_id,
        version=version,
        max_minutes=minutes,
        ema_decay=ema,
        lesion_weight=lesion_weight,
        lesion_crop=lesion_crop,
        fulldose_target=fulldose_target,
        own_texture=own_texture,
        init_from=str(init) if init else None,
        ssim_weight=ssim_weight,
        sharp_shapes=sharp_shapes,
        own_noise=own_noise,
        prediction=prediction,
        train_t_max=train_t_max,
        p_uncond=p_uncond,
        sampling=sampling or None,
    )
    _check_recipe(tc)
    out_root = out or settings.models_dir
    dev = resolve_device(device or settings.engine.device)
    threads = settings.engine.threads
    data_path = data or (out_root / ".runs" / f"train-{n_train}x{size}.npz")
    data_path.parent.mkdir(parents=True, exist_ok=True)
    model_dir = _train_with_progress(tc, data_path, out_root, resume=resume, device=dev,
                                     threads=threads)
    cfg = json.loads((model_dir / "config.json").read_text())
    console.print(
        f"wrote {model_dir} ({cfg['n_parameters']} parameters, {cfg['training']['seconds']} s); "
        f"torch threads {torch.get_num_threads()}"
    )


def _check_recipe(tc: TrainConfig) -> None:
    """Refuse options the task's training data does not support, then run the recipe's own
    checks (prediction, ssim_weight, train_t_max, sampling vs the task contract)."""
    from engine.research.train import model_config

    task = tc.task
    if (tc.lesion_weight or tc.lesion_crop) and task == "mr_denoise":
        fail("--lesion-weight / --lesion-crop apply to ct_denoise and ct_to_mr")
    if tc.fulldose_target and task not in ("ct_denoise", "ct_augment"):
        fail("--fulldose-target applies to ct_denoise and ct_augment (CT restoration data)")
    if tc.own_noise and task != "mr_denoise":
        fail("--own-noise applies to mr_denoise only")
    if tc.sharp_shapes and task != "ct_denoise":
        fail("--sharp-shapes applies to ct_denoise only")
    try:
        model_config(tc)
    except ValueError as exc:
        fail(str(exc))


def _train_with_progress(tc: TrainConfig, data_path: Path, out_root: Path, *, resume: bool,
                         device: str, threads: int) -> Path:
    """Build the training data if ``data_path`` is missing, load it and train, with progress
    bars; returns the model folder."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from engine.research.train import load_data, prepare_data, train

    n_train, size = tc.n_train, tc.size
    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*cols, console=console) as prog:
        if not data_path.exists():
            t = prog.add_task("phantoms + low dose", total=n_train, info="")
            prepare_data(
                data_path, n_train, size, "train", progress=lambda i, n: prog.update(t, completed=i)
            )
        d = _training_data(load_data(data_path), data_path, tc)
        t = prog.add_task(f"train {tc.task} ({tc.objective})", total=tc.steps, info="")

        def on_step(i: int, n: int, rec: dict) -> None:
            prog.update(
                t, completed=i, total=n, info=f"loss {rec['loss_ema']:.4g} lr {rec['lr']:.2e}"
            )

        return train(
            tc,
            out_root,
            d,
            resume=resume,
            device=device,
            threads=threads,
            progress=on_step,
            data_description=_data_description(d, n_train, size),
        )


def _training_data(d: dict[str, Any], data_path: Path, tc: TrainConfig) -> dict[str, Any]:
    """The first ``tc.n_train`` phantoms of loaded training data; refuses data that is too
    small, of another size, or without the lesion masks the recipe needs."""
    n_train, size = tc.n_train, tc.size
    if d["ct"].shape[0] < n_train or d["ct"].shape[-1] != size:
        fail(
            f"{data_path} holds {d['ct'].shape[0]} phantoms of {d['ct'].shape[-1]} px, "
            f"need {n_train} x {size}"
        )
    d = {
        **d,
        **{
            k: d[k][:n_train]
            for k in ("ct", "ld", "nd", "t1w", "t2w", "dose", "seeds", "kinds", "les")
            if k in d
        },
    }
    if (tc.lesion_weight or tc.lesion_crop) and "les" not in d:
        fail(f"{data_path} has no lesion masks (built before they were stored); rebuild it")
    return d


def _data_description(d: dict[str, Any], n_train: int, size: int) -> str:
    """The model card's "Training data" text."""
    return (
        f"{n_train} phantoms of the `train` split (seeds {int(d['seeds'].min())}-"
        f"{int(d['seeds'].max())}, engine.research.phantoms v{_phantom_version()}), abdomen and "
        "MNI152 "
        f"head alternating, 3 contiguous slices of {size}x{size} px (2 mm apart); low-dose CT "
        "by projection-domain Poisson noise "
        f"(engine.research.degrade, {d['meta'].get('angles')} views) "
        f"at doses {d['meta'].get('doses')} plus dose 1.0; MR targets noise-free without bias "
        "field, Rician noise (SNR 8-40) drawn during training. No validation/test-split "
        "phantom and no real image was used for training."
    )


def _key_values(option: str, items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` options as a dict; numbers ("4", "1.0", "-0.5") become numbers."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            fail(f"{option} needs KEY=VALUE, got {item!r}")
        val = val.strip()
        out[key.strip()] = json.loads(val) if val.replace(".", "", 1).lstrip("-").isdigit() else val
    return out


def _phantom_version() -> int:
    from engine.research import phantoms

    return int(phantoms.PHANTOM_VERSION)


@app.command("evaluate")
def evaluate_cmd(
    task: str = typer.Argument(
        ..., help="ct_denoise | mr_denoise | ct_to_mr | augment | ct_sparse_view | "
        "mr_undersampled"),
    model: list[Path] = typer.Option(
        [], "--model", help="model folder (repeat: diffusion, regressor)"
    ),
    n: int = typer.Option(8, "--n", min=1, help="held-out test-split phantoms"),
    size: int | None = typer.Option(
        None, "--size", help="px (default 512 for ct_denoise, else 256)"
    ),
    slices: int = typer.Option(3, "--slices", min=1),
    dose: list[float] = typer.Option([0.25], "--dose", help="dose fraction(s) for ct_denoise"),
    snr: list[float] = typer.Option([15.0], "--snr", help="SNR(s) for mr_denoise"),
    real: bool = typer.Option(True, "--real/--no-real", help="also the real pydicom CT slices"),
    param: list[str] = typer.Option([], "--param", help="task parameter KEY=VALUE (repeat)"),
    seed: int = typer.Option(0, "--seed", min=0),
    out: Path = typer.Option(
        Path("bench/results/eval"), "--out", help="report folder (TASK appended)"
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="cache of simulated cases (default: temp dir)"
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Evaluate models and baselines on held-out phantoms (+ real CT / MR): Markdown + PNG report.

    ct_sparse_view / mr_undersampled: --model is an adapter folder (its base beside it);
    baseline TV; the real images get the task's simulated degradation.

    augment: --model is an augmentation model; --param n=K sets the variants per input (default 4).
    """
    import tempfile

    import torch

    from node.evaluation.realdata import evaluate_task

    settings = settings_from(config)
    if settings.engine.threads:
        torch.set_num_threads(settings.engine.threads)
    params = _key_values("--param", param)
    try:
        report = evaluate_task(
            task,
            out / task,
            models=list(model),
            n=n,
            size=size,
            n_slices=slices,
            doses=tuple(dose),
            snrs=tuple(snr),
            real=real,
            seed=seed,
            params=params,
            options=settings.engine,
            cache_dir=cache or Path(tempfile.gettempdir()) / "synthnode-eval-cache",
        )
    except ValueError as exc:
        fail(str(exc))
    console.print(f"wrote {report}")


@app.command("average")
def average_cmd(
    models: list[Path] = typer.Argument(
        ...,
        exists=True,
        file_okay=False,
        help="model folders (same architecture and task; the first one's recipe "
        "and contract are kept)",
    ),
    out: Path = typer.Option(..., "--out", help="new model folder"),
    weight: list[float] = typer.Option(
        [], "--weight", help="weight per model (repeat; default equal)"
    ),
    version: str | None = typer.Option(None, "--version", help="version of the averaged model"),
    model_id: str | None = typer.Option(None, "--model-id"),
) -> None:
    """Average the weights of models of one architecture (a fine-tune and its starting point):
    a new model folder whose config and card name every source and its weight."""
    from engine.research.train import average_models

    if out.resolve() in [m.resolve() for m in models]:
        fail("--out must be a new folder, not one of the averaged models")
    try:
        d = average_models(
            list(models), out, weights=list(weight) or None, version=version, model_id=model_id
        )
    except ValueError as exc:
        fail(str(exc))
    console.print(
        f"wrote {d} (mean of {len(models)} models); evaluate it, then "
        f"`synthnode engine package {d}`"
    )


@app.command("package")
def package_cmd(
    model_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="model folder"),
    metrics_md: Path | None = typer.Option(
        None,
        "--metrics-md",
        exists=True,
        dir_okay=False,
        help="Markdown with held-out metrics for the model card",
    ),
    intended_use: str = typer.Option(
        "research and engineering validation on phantoms; not for diagnosis; outputs are synthetic",
        "--intended-use",
    ),
) -> None:
    """Refresh MODEL_CARD.md (digest, metrics) and write manifest.json through the model gate
    (an adapter's manifest also records its base: model id, version, weights digest)."""
    from audit.modelgate import build_manifest, write_manifest
    from engine.adapters import is_adapter

    cfg = json.loads((model_dir / "config.json").read_text())
    if is_adapter(cfg):
        from engine.research.adapters import write_card

        write_card(model_dir, metrics_md=metrics_md.read_text() if metrics_md else None)
    else:
        from engine.research.train import write_model_card

        write_model_card(model_dir, metrics_md=metrics_md.read_text() if metrics_md else None)
    man = model_dir / "manifest.json"
    if man.exists():
        man.unlink()
    m = build_manifest(
        model_dir,
        model_id=cfg["model_id"],
        version=cfg["version"],
        task=cfg["tasks"][0],
        intended_use=intended_use,
        base=cfg["base"] if is_adapter(cfg) else None,
    )
    write_manifest(model_dir, m)
    console.print(
        f"{model_dir}: card refreshed, manifest with {len(m['files'])} file(s) written "
        "(not approved)"
    )
