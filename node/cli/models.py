"""``synthnode models``: the model admission gate (see :mod:`audit.modelgate`).

keygen      new approver key (Ed25519, mode 0600); optionally add it to the site config
manifest    write manifest.json (per-file SHA-256) for a model folder
approve     sign a folder's manifest (or --all folders) and record model.approved
revoke      revoke a model version (model.revoked) or an approver key (key.revoked); asks
            first, refuses a model version or key id that is not known
verify      run the gate's full check on folders, as the engine would load them
list        folders under the models directory and their state
"""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from node.cli.common import (
    ConfigOption,
    YesOption,
    config_path,
    confirm,
    console,
    err_console,
    fail,
    open_engine,
    settings_from,
)

app = typer.Typer(no_args_is_help=True)


def _gate(config: Path | None, actor: str = "user:cli"):  # type: ignore[no-untyped-def]
    from audit.ledger import Ledger
    from audit.modelgate import Approver, ModelGate

    settings = settings_from(config)
    try:
        approvers = Approver.from_config(settings.audit.approvers)
    except (ValueError, OSError) as exc:
        fail(f"audit.approvers: {exc}")
    ledger = Ledger(open_engine(settings, config))
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
    yes: bool = YesOption,
    config: Path | None = ConfigOption,
) -> None:
    """Sign model manifests and record model.approved (the folder must match its manifest).
    The key must be one of the config's [[audit.approvers]]; lists what it will approve and
    asks first (approvals are permanent ledger records)."""
    from audit.modelgate import ModelRefused, key_fingerprint, load_private_key

    settings, gate = _gate(config)
    try:
        priv = load_private_key(key)
    except (OSError, ValueError) as exc:
        fail(f"cannot load {key}: {exc}")
        return
    kid = key_fingerprint(priv.public_key())
    if kid not in gate.approvers:
        where = config_path(config) or "the bundled defaults"
        fail(f"key {kid} ({key}) is not among the [[audit.approvers]] of {where}: the gate "
             "would never accept its approvals. Add it (`synthnode models keygen ... "
             "--add-to-config FILE` does) or use a configured approver's key")
    chosen = _folders(settings, folders or [], all_)
    plan = [(f, gate.status(f)) for f in chosen]
    for f, st in plan:
        console.print(f"  {f.name}: {st.model_id} {st.version} ({st.state})", highlight=False,
                      soft_wrap=True)
    confirm(f"Approve these {len(plan)} model folder(s) with key {kid} "
            f"({gate.approvers[kid].name})?", yes)
    bad = 0
    for folder, _st in plan:
        try:
            p = gate.approve(folder, priv, name)
            console.print(
                f"approved {folder.name}: version {p['version']} "
                f"manifest {p['manifest_sha256'][:16]} key {kid}", highlight=False,
                soft_wrap=True)
        except ModelRefused as exc:
            err_console.print(f"[red]{exc}[/red]")
            bad += 1
    if bad:
        raise typer.Exit(1)


def _known_models(settings, gate) -> dict[tuple[str, str], str]:  # type: ignore[no-untyped-def]
    """``(model_id, version) -> where it is known``: folders under the models directory and
    models the ledger has approved, loaded or refused."""
    from audit.events import EventType
    from audit.modelgate import ModelGate

    known: dict[tuple[str, str], str] = {}
    for f in ModelGate.folders(settings.models_dir):
        st = gate.status(f)
        known[(st.model_id, st.version)] = f"folder {f}"
    types = [EventType.MODEL_APPROVED.value, EventType.MODEL_LOADED.value]
    for e in gate.ledger.query(event_types=types):
        ev = e.event
        mid, ver = ev.subject.get("model_id"), ev.payload.get("version")
        if mid and ver:
            known.setdefault((str(mid), str(ver)), f"ledger entry {e.seq}")
    return known


def _known_keys(gate) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Approver key ids (16 hex digits) -> name: configured ones and those that signed an
    approval recorded in the ledger."""
    from audit.events import EventType

    keys = {kid: a.name for kid, a in gate.approvers.items()}
    for e in gate.ledger.query(event_types=[EventType.MODEL_APPROVED.value]):
        kid = e.event.payload.get("key_id")
        if kid:
            keys.setdefault(str(kid), str(e.event.payload.get("approver") or "?"))
    return keys


@app.command()
def revoke(
    model_id: str | None = typer.Argument(None, help="model id"),
    version: str | None = typer.Argument(None, help="model version"),
    key_id: str | None = typer.Option(None, "--key-id",
                                      help="revoke an approver key instead (all 16 hex digits)"),
    reason: str = typer.Option(..., "--reason", help="why (recorded in the ledger)"),
    yes: bool = YesOption,
    config: Path | None = ConfigOption,
) -> None:
    """Revoke a model version, or with --key-id an approver key. Permanent: only a model
    version or key the node knows is accepted, and it asks first (--yes does not ask)."""
    import difflib

    settings, gate = _gate(config)
    if key_id:
        keys = _known_keys(gate)
        if key_id not in keys:
            near = [k for k in keys if k.startswith(key_id.lower())] or \
                difflib.get_close_matches(key_id, list(keys), n=2)
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            fail(f"unknown approver key id {key_id!r} (give all 16 hex digits of a configured "
                 f"or recorded approver key{hint})")
        if key_id in gate.revoked_keys():
            fail(f"key {key_id} is already revoked")
        confirm(f"Revoke approver key {key_id} ({keys[key_id]}) permanently? Every approval "
                "it signed stops counting at once.", yes)
        gate.revoke_key(key_id, reason)
        console.print(f"revoked key {key_id}", highlight=False)
        return
    if not model_id or not version:
        fail("give MODEL_ID VERSION, or --key-id", 2)
        return
    known = _known_models(settings, gate)
    if (model_id, version) not in known:
        names = sorted({f"{m} {v}" for m, v in known})
        near = difflib.get_close_matches(f"{model_id} {version}", names, n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        fail(f"unknown model {model_id!r} version {version!r}: no model folder or ledger "
             f"record has it{hint}")
    if gate.is_revoked(model_id, version):
        fail(f"{model_id} {version} is already revoked")
    confirm(f"Revoke {model_id} {version} ({known[(model_id, version)]}) permanently? A "
            "revoked version never runs again.", yes)
    gate.revoke(model_id, version, reason)
    console.print(f"revoked {model_id} {version}", highlight=False)


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
            vm, _base = gate.load_with_base(folder, settings.models_dir)  # adapters: + base
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
