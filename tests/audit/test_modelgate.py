"""Model gate: approved models load with the exact bytes checked; every mutation after
approval, unsigned / unknown-key / revoked-key / revoked models, symlinks and pickles are
refused with a model.refused ledger event."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from audit.events import EventType
from audit.ledger import Ledger
from audit.modelgate import (
    Approver,
    ModelGate,
    ModelRefused,
    build_manifest,
    generate_approver_key,
    key_fingerprint,
    write_manifest,
)
from node.db import make_engine


def make_model(root: Path, model_id: str = "ct-restore-tiny", version: str = "1.0.0") -> Path:
    d = root / model_id
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(st_save({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}))
    (d / "config.json").write_text(json.dumps({"channels": 8}))
    (d / "MODEL_CARD.md").write_text("# tiny\nFor tests only.\n")
    write_manifest(d, build_manifest(d, model_id=model_id, version=version, task="ct_restore",
                                     intended_use="unit tests"))
    return d


@pytest.fixture
def gate_env(migrated_db: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    ledger = Ledger(make_engine(migrated_db))
    key = generate_approver_key(tmp_path / "keys" / "alice.key")
    gate = ModelGate(ledger, [Approver("alice", key.public_key())], actor="user:test")
    model = make_model(tmp_path / "models")
    return ledger, gate, key, model, tmp_path


def _refused(ledger: Ledger, gate: ModelGate, model: Path, match: str) -> None:
    before = ledger.size()
    with pytest.raises(ModelRefused, match=match):
        gate.load(model)
    last = ledger.entry(ledger.size() - 1).event
    assert ledger.size() == before + 1
    assert last.type == EventType.MODEL_REFUSED
    assert re.search(match, last.payload["reason"]), last.payload


def test_approved_model_loads_with_checked_bytes(gate_env) -> None:  # type: ignore[no-untyped-def]
    ledger, gate, key, model, _ = gate_env
    assert gate.status(model).state == "unapproved"
    gate.approve(model, key)
    vm = gate.load(model)
    weights = (model / "model.safetensors").read_bytes()
    assert vm.files["model.safetensors"] == weights
    assert vm.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert vm.key_id == key_fingerprint(key.public_key()) and vm.approver == "alice"
    np.testing.assert_array_equal(st_load(vm.weights["model.safetensors"])["w"].ravel(), np.arange(12))
    kinds = [e.event.type for e in ledger.entries()]
    assert kinds == [EventType.MODEL_APPROVED, EventType.MODEL_LOADED]
    assert ledger.entry(1).event.payload["weights_sha256"] == vm.weights_sha256
    assert gate.status(model).state == "approved"


def test_unsigned_refused(gate_env) -> None:  # type: ignore[no-untyped-def]
    ledger, gate, _key, model, _ = gate_env
    _refused(ledger, gate, model, "unsigned")


@pytest.mark.parametrize("mutation", ["byte", "add", "remove", "rename", "symlink", "pickle", "manifest"])
def test_mutation_after_approval_refused(gate_env, mutation: str) -> None:  # type: ignore[no-untyped-def]
    ledger, gate, key, model, _ = gate_env
    gate.approve(model, key)
    w = model / "model.safetensors"
    if mutation == "byte":
        b = bytearray(w.read_bytes())
        b[-1] ^= 0x01
        w.write_bytes(bytes(b))
        match = "differs from the manifest"
    elif mutation == "add":
        (model / "extra.txt").write_text("x")
        match = "not in the manifest"
    elif mutation == "remove":
        (model / "MODEL_CARD.md").unlink()
        match = "missing"
    elif mutation == "rename":
        w.rename(model / "model2.safetensors")
        match = "not in the manifest"
    elif mutation == "symlink":
        target = model.parent / "elsewhere.safetensors"
        w.rename(target)
        os.symlink(target, w)
        match = "symlink"
    elif mutation == "pickle":
        (model / "weights.pt").write_bytes(b"\x80\x04pickle")
        match = "pickle"
    else:  # edit the manifest (e.g. the intended use) after approval
        m = json.loads((model / "manifest.json").read_text())
        m["intended_use"] = "anything"
        write_manifest(model, m)
        match = "no approval"
    _refused(ledger, gate, model, match)


def test_wrong_key_and_revoked_key_refused(gate_env) -> None:  # type: ignore[no-untyped-def]
    ledger, gate, key, model, tmp = gate_env
    mallory = generate_approver_key(tmp / "keys" / "mallory.key")
    gate.approve(model, mallory, "mallory")  # recorded, but mallory is no approver
    _refused(ledger, gate, model, "unknown key")
    gate.approve(model, key)
    assert gate.load(model).approver == "alice"
    gate.revoke_key(key_fingerprint(key.public_key()), "laptop stolen")
    _refused(ledger, gate, model, "revoked key")
    with pytest.raises(ModelRefused, match="revoked"):
        gate.approve(model, key)


def test_revoked_model_refused(gate_env) -> None:  # type: ignore[no-untyped-def]
    ledger, gate, key, model, _ = gate_env
    gate.approve(model, key)
    gate.load(model)
    gate.revoke("ct-restore-tiny", "1.0.0", "lesion erasure found")
    _refused(ledger, gate, model, "revoked")
    assert gate.status(model).state == "revoked"
    with pytest.raises(ModelRefused, match="revoked"):
        gate.approve(model, key)


def test_forged_approval_event_refused(gate_env) -> None:  # type: ignore[no-untyped-def]
    """An approval event claiming alice's key id with a signature over other bytes."""
    from audit.events import Event

    ledger, gate, key, model, tmp = gate_env
    payload = gate.approve(model, key)
    m = json.loads((model / "manifest.json").read_text())
    m["version"] = "2.0.0"
    write_manifest(model, m)
    from audit.modelgate import manifest_sha256

    forged = {**payload, "version": "2.0.0", "manifest_sha256": manifest_sha256(m)}
    ledger.append(Event(EventType.MODEL_APPROVED, "user:mallory", subject={"model_id": m["model_id"]},
                        payload=forged))
    _refused(ledger, gate, model, "does not verify")


def test_pickle_manifest_and_missing_weights_refused(tmp_path: Path, migrated_db: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.pth").write_bytes(b"\x80\x04")
    (d / "config.json").write_text("{}")
    (d / "MODEL_CARD.md").write_text("x")
    with pytest.raises(ModelRefused, match="pickle"):
        build_manifest(d, model_id="m", version="1", task="t", intended_use="u")
    (d / "model.pth").unlink()
    with pytest.raises(ModelRefused, match="safetensors"):
        build_manifest(d, model_id="m", version="1", task="t", intended_use="u")


def _make_adapter(root: Path, base: dict[str, str]) -> Path:
    d = root / "adapter"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(st_save({"c": np.ones((2, 2), dtype=np.float32)}))
    (d / "config.json").write_text(json.dumps({"kind": "controlnet_adapter"}))
    (d / "MODEL_CARD.md").write_text("# adapter\nFor tests only.\n")
    write_manifest(d, build_manifest(d, model_id="ct-sparse-tiny", version="0.1.0",
                                     task="ct_sparse_view", intended_use="unit tests",
                                     base=base))
    return d


def test_adapter_loads_only_on_its_recorded_base(gate_env) -> None:  # type: ignore[no-untyped-def]
    """The adapter's manifest records its base (model id + weights digest); the gate admits it
    with that verified base and refuses it alone, on another base, or on a changed base."""
    ledger, gate, key, model, tmp = gate_env
    gate.approve(model, key)
    base = gate.load(model)
    rec = {"model_id": base.model_id, "version": base.version,
           "weights_sha256": base.weights_sha256}
    adapter = _make_adapter(tmp / "adapters", rec)
    gate.approve(adapter, key)
    vm = gate.load(adapter, base=base)
    assert vm.manifest["base"] == rec
    assert ledger.entry(ledger.size() - 1).event.payload["base"] == rec
    with pytest.raises(ModelRefused, match="loaded without its base"):
        gate.load(adapter)
    assert ledger.entry(ledger.size() - 1).event.type == EventType.MODEL_REFUSED
    # another approved model as the base: refused, with both names in the reason
    other_dir = make_model(tmp / "others", model_id="other-base")
    gate.approve(other_dir, key)
    other = gate.load(other_dir)
    with pytest.raises(ModelRefused, match="adapter is for base ct-restore-tiny .* not other-base"):
        gate.load(adapter, base=other)
    # a base retrained under the same id (new weights, new version, approved): refused
    retrained = make_model(tmp / "retrained", version="1.1.0")
    (retrained / "model.safetensors").write_bytes(st_save({"w": np.zeros((3, 4), np.float32)}))
    write_manifest(retrained, build_manifest(retrained, model_id="ct-restore-tiny",
                                             version="1.1.0", task="ct_restore",
                                             intended_use="unit tests"))
    gate.approve(retrained, key)
    with pytest.raises(ModelRefused, match="not ct-restore-tiny 1.1.0"):
        gate.load(adapter, base=gate.load(retrained))
    # a plain model given a base: refused
    with pytest.raises(ModelRefused, match="not an adapter"):
        gate.load(other_dir, base=base)
    # a malformed base record is refused when the manifest is built
    with pytest.raises(ModelRefused, match="manifest base"):
        _make_adapter(tmp / "bad", {**rec, "weights_sha256": "xyz"})


def test_load_with_base_finds_the_adapters_base_folder(gate_env) -> None:  # type: ignore[no-untyped-def]
    """``load_with_base``: a plain model alone; an adapter with the folder of its base (by model
    id and weights digest, among several versions of that id), refused when there is none."""
    ledger, gate, key, model, tmp = gate_env
    models = model.parent
    old = make_model(tmp / "elsewhere", version="0.9.0")  # same id, other weights, other folder
    (old / "model.safetensors").write_bytes(st_save({"w": np.zeros((3, 4), np.float32)}))
    write_manifest(old, build_manifest(old, model_id="ct-restore-tiny", version="0.9.0",
                                       task="ct_restore", intended_use="unit tests"))
    old.rename(models / "a-old-ct-restore-tiny")
    for d in (model, models / "a-old-ct-restore-tiny"):
        gate.approve(d, key)
    vm, base = gate.load_with_base(model)
    assert base is None and vm.model_id == "ct-restore-tiny"
    rec = {"model_id": vm.model_id, "version": vm.version, "weights_sha256": vm.weights_sha256}
    adapter = _make_adapter(models, rec)
    gate.approve(adapter, key)
    got, base = gate.load_with_base(adapter)
    assert base is not None and base.model_dir == model and got.manifest["base"] == rec
    lone = tmp / "lone"
    lone.mkdir()
    adapter.rename(lone / "adapter")
    with pytest.raises(ModelRefused, match="not found"):
        gate.load_with_base(lone / "adapter")
    assert ledger.entry(ledger.size() - 1).event.type == EventType.MODEL_REFUSED
