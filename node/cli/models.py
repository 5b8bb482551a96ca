"""``synthnode models``: the model admission gate (see :mod:`audit.modelgate`).

keygen      new approver key (Ed25519, mode 0600); optionally add it to the site config
manifest    write manifest.json (per-file SHA-256) for a model folder
approve     sign a folder's manifest (or --all folders) and record model.approved
revoke      revoke a model version (model.revoked) or an approver key (key.revoked)
verify      run the gate's full check on folders, as the engine would load them
list        folders under the models directory and their state
"""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from node.cli.common import ConfigOption, console, err_console, fail, settings_from

app = typer.Typer(no_args_is_help=True)


def _gate(config: Path | None, actor: str = "user:cli"):  # type: ignore[no-untyped-def]
    from audit.ledger import Ledger
    from audit.modelgate import Approver, ModelGate
    from node.db import make_engine

    settings = settings_from(config)
    try:
        approvers = Approver.from_config(settings.audit.approvers)
    except ValueError as exc:
        fail(f"audit.approvers: {exc}")
    try:
        ledger = Ledger(make_engine(settings.database_url))
    except Exception as exc:
        fail(
            f"cannot open the ledger at {settings.database_url}: {exc} (run `synthnode db upgrade`)"
        )
    return settings, ModelGate(ledger, approvers, actor=actor)


def _folders(settings, dirs: list[Path], all_: bool) -> list[Path]:  # type: ignore[no-untyped-def]
    from audit.modelgate import ModelGate

    if all_:
        found = ModelGate.folders(settings.models_dir)
        if not found:
            fail(f"no model folders with a manifest.json under {settings.models_dir}")
        return found
    if not dirs:
        fail("give model folder(s) or --all")
    return dirs


@app.command()
def keygen(
    out: Path = typer.Option(..., "--out", "-o", help="private key file to create (mode 0600)"),
    name: str = typer.Option(..., "--name", help="approver name, e.g. the site admin"),
    add_to_config: Path | None = typer.Option(None, "--add-to-config",
                                              help="append this approver to that TOML config file"),
) -> None:
    """Create an approver key and print its [[audit.approvers]] entry."""
    from audit.modelgate import generate_approver_key, key_fingerprint, public_key_b64

    if out.exists():
        fail(f"{out} exists; refusing to overwrite a key")
    key = generate_approver_key(out)
    pub = public_key_b64(key.public_key())
    snippet = f'\n[[audit.approvers]]\nname = "{name}"\npublic_key = "{pub}"\n'
    console.print(f"approver key {key_fingerprint(key.public_key())} written to {out}")
    if add_to_config:
        with add_to_config.open("a", encoding="utf-8") as fh:
            fh.write(snippet)
        console.print(f"added approver {name!r} to {add_to_config}")
    else:
        print(snippet.strip())


@app.command()
def manifest(
    folder: Path = typer.Argument(..., help="model folder"),
    model_id: str | None = typer.Option(None, "--model-id"),
    version: str | None = typer.Option(None, "--version"),
    task: str | None = typer.Option(None, "--task"),
    intended_use: str | None = typer.Option(None, "--intended-use"),
) -> None:
    """(Re)write manifest.json with the SHA-256 of every file; metadata defaults come from an
    existing manifest.json, then config.json."""
    from audit.modelgate import (
        MANIFEST,
        ModelRefused,
        build_manifest,
        manifest_sha256,
        write_manifest,
    )

    meta: dict[str, str] = {}
    for src in (folder / "config.json", folder / MANIFEST):
        if src.is_file():
            try:
                d = json.loads(src.read_text())
            except ValueError:
                continue
            meta.update(
                {k: str(d[k]) for k in ("model_id", "version", "task", "intended_use") if d.get(k)}
            )
            if not d.get("task") and isinstance(d.get("tasks"), list) and d["tasks"]:
                meta.setdefault("task", str(d["tasks"][0]))  # engine config.json lists its tasks
    given = {"model_id": model_id, "version": version, "task": task, "intended_use": intended_use}
    meta.update({k: v for k, v in given.items() if v})
    missing = [k for k in given if not meta.get(k)]
    if missing:
        fail(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)}")
    try:
        m = build_manifest(
            folder,
            model_id=meta["model_id"],
            version=meta["version"],
            task=meta["task"],
            intended_use=meta["intended_use"],
        )
    except ModelRefused as exc:
        fail(str(exc))
        return
    path = write_manifest(folder, m)
    console.print(f"wrote {path} ({len(m['files'])} files, manifest sha256 {manifest_sha256(m)})")


@app.command()
def approve(
    folders: list[Path] = typer.Argument(None, help="model folders"),
    key: Path = typer.Option(..., "--key", help="approver private key (from `models keygen`)"),
    name: str | None = typer.Option(None, "--name", help="approver name (default: from config)"),
    all_: bool = typer.Option(False, "--all", help="every folder under the models directory"),
    config: Path | None = ConfigOption,
) -> None:
    """Sign model manifests and record model.approved (the folder must match its manifest)."""
    from audit.modelgate import ModelRefused, key_fingerprint, load_private_key

    settings, gate = _gate(config)
    try:
        priv = load_private_key(key)
    except (OSError, ValueError) as exc:
        fail(f"cannot load {key}: {exc}")
        return
    kid = key_fingerprint(priv.public_key())
    if kid not in gate.approvers:
        err_console.print(
            f"[yellow]warning:[/yellow] key {kid} is not in audit.approvers of this config; "
            "the gate will not accept this approval until it is"
        )
    bad = 0
    for folder in _folders(settings, folders or [], all_):
        try:
            p = gate.approve(folder, priv, name)
            console.print(
                f"approved {folder.name}: version {p['version']} "
                f"manifest {p['manifest_sha256'][:16]} key {kid}"
            )
        except ModelRefused as exc:
            err_console.print(f"[red]{exc}[/red]")
            bad += 1
    if bad:
        raise typer.Exit(1)


@app.command()
def revoke(
    model_id: str | None = typer.Argument(None, help="model id"),
    version: str | None = typer.Argument(None, help="model version"),
    key_id: str | None = typer.Option(None, "--key-id", help="revoke an approver key instead"),
    reason: str = typer.Option(..., "--reason", help="why (recorded in the ledger)"),
    config: Path | None = ConfigOption,
) -> None:
    """Revoke a model version, or with --key-id an approver key (permanent)."""
    _settings, gate = _gate(config)
    if key_id:
        gate.revoke_key(key_id, reason)
        console.print(f"revoked key {key_id}")
        return
    if not model_id or not version:
        fail("give MODEL_ID VERSION, or --key-id")
        return
    gate.revoke(model_id, version, reason)
    console.print(f"revoked {model_id} {version}")


@app.command()
def verify(
    folders: list[Path] = typer.Argument(None, help="model folders"),
    all_: bool = typer.Option(False, "--all", help="every folder under the models directory"),
    config: Path | None = ConfigOption,
) -> None:
    """Full gate check (bytes, manifest, approval, revocation); exit 1 if any is refused."""
    from audit.modelgate import ModelRefused

    settings, gate = _gate(config)
    bad = 0
    for folder in _folders(settings, folders or [], all_):
        try:
            vm = gate.verify(folder)
            console.print(
                f"[green]OK[/green] {vm.model_id} {vm.version}: weights sha256 {vm.weights_sha256} "
                f"approved by {vm.approver} ({vm.key_id})"
            )
        except ModelRefused as exc:
            err_console.print(f"[red]REFUSED[/red] {exc}")
            bad += 1
    if bad:
        raise typer.Exit(1)


@app.command("list")
def list_(
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Model folders under the models directory with their state (nothing is recorded)."""
    settings, gate = _gate(config)
    root = settings.models_dir
    # a model folder holds files; a folder of folders (e.g. experimental/) is not a model
    folders = sorted(
        p for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(c.is_file() for c in p.iterdir())
    ) if root.is_dir() else []
    rows = [gate.status(f) for f in folders]
    if as_json:
        for s in rows:
            print(
                json.dumps(
                    {
                        "folder": str(s.model_dir),
                        "model_id": s.model_id,
                        "version": s.version,
                        "manifest_sha256": s.manifest_sha256,
                        "state": s.state,
                        "detail": s.detail,
                    }
                )
            )
        return
    table = Table("folder", "model_id", "version", "state", "detail", title=str(root))
    for s in rows:
        color = {"approved": "green", "revoked": "red", "invalid": "red"}.get(s.state, "yellow")
        table.add_row(
            s.model_dir.name, s.model_id, s.version, f"[{color}]{s.state}[/{color}]", s.detail
        )
    console.print(table)
