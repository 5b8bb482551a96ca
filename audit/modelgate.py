"""Model admission gate: only approved, unmodified, pickle-free models load.

A model is a folder::

    <model_dir>/
        manifest.json      {"model_id", "version", "task", "intended_use",
                            "files": {"<relpath>": "<sha256 hex>", ...}}
        config.json        listed in files
        MODEL_CARD.md      listed in files
        *.safetensors      listed in files (at least one)

An *adapter* (a small network trained on a frozen base model, engine.adapters) also records
its base: ``"base": {"model_id", "version", "weights_sha256"}``; :meth:`ModelGate.load` admits
it only together with that base, verified (``load(adapter_dir, base=verified_base)``), and
refuses it on any other base or on none.

``files`` lists every file of the folder except ``manifest.json`` itself, with POSIX
relative paths. The *canonical manifest bytes* are the manifest in canonical JSON (sorted
keys, no whitespace, UTF-8: :func:`audit.events.canonical_json`); ``manifest_sha256`` is
their SHA-256.

Approval is an Ed25519 signature over the canonical manifest bytes by a key listed in
``[[audit.approvers]]`` (config); it is recorded as a ``model.approved`` ledger event
carrying the signature, so approvals are as tamper-evident as everything else. Revocations
are ``model.revoked`` (subject ``model_id``, payload ``version``) and ``key.revoked``
(subject ``key_id`` = first 16 hex digits of SHA-256 of the raw public key) events; both
are permanent (a revoked model version needs a new version to run again).

:meth:`ModelGate.load` reads every file's bytes once, hashes those bytes, compares with
the manifest and returns them: the digest checked is the digest of the bytes the engine
loads (``safetensors.torch.load(verified.files[name])``). Anything else is refused with
:class:`ModelRefused` and a ``model.refused`` ledger event: no or bad signature, unknown or
revoked key, revoked model, any changed byte, a file added, removed or renamed, a symlink,
a pickle-based format (.pt, .pth, .bin, .pkl, .pickle, .ckpt, .joblib, .npy, .npz).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.events import Event, EventType, Outcome, canonical_json
from audit.keys import read_private_key, write_new_private_key
from audit.ledger import Ledger

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REQUIRED_FILES = ("config.json", "MODEL_CARD.md")
WEIGHTS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset(
    {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
)
MANIFEST_KEYS = ("model_id", "version", "task", "intended_use", "files")
BASE_KEYS = ("model_id", "version", "weights_sha256")  # an adapter's "base" record


class ModelRefused(Exception):
    """The gate refuses to load or approve a model; ``reason`` says why."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"model {model} refused: {reason}")


# -- keys --------------------------------------------------------------------------------
def key_fingerprint(public: Ed25519PublicKey) -> str:
    """Approver key id: first 16 hex digits of SHA-256 of the raw 32-byte public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_b64(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(value: str) -> Ed25519PublicKey:
    """An approver public key: base64 of the raw 32 bytes, or a path to a PEM file."""
    value = value.strip()
    try:
        raw = base64.b64decode(value, validate=True)
        if len(raw) == 32:
            return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        pass
    path = Path(value).expanduser()
    if path.is_file():
        pub = serialization.load_pem_public_key(path.read_bytes())
        if isinstance(pub, Ed25519PublicKey):
            return pub
        raise ValueError(f"{path} is not an Ed25519 public key")
    raise ValueError("approver public_key must be base64 of 32 raw bytes or a PEM file path")


def generate_approver_key(path: Path) -> Ed25519PrivateKey:
    """Write a new Ed25519 private key (PKCS#8 PEM) to ``path`` with mode 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_new_private_key(path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    return read_private_key(path)


@dataclass(frozen=True)
class Approver:
    name: str
    public: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_fingerprint(self.public)

    @classmethod
    def from_config(cls, entries: Iterable[Any]) -> list[Approver]:
        """From ``settings.audit.approvers`` (objects with ``name`` and ``public_key``)."""
        return [cls(e.name, parse_public_key(e.public_key)) for e in entries]


# -- manifest ----------------------------------------------------------------------------
def canonical_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return canonical_json(manifest)


def manifest_sha256(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest()


def _is_pickle(name: str) -> bool:
    return Path(name).suffix.lower() in PICKLE_SUFFIXES


def scan_folder(model_dir: Path) -> list[str]:
    """Relative POSIX paths of every file under ``model_dir`` except the manifest.

    Raises
    ------
    ModelRefused
        a symlink or a non-regular file is present.
    """
    model_dir = Path(model_dir)
    label = model_dir.name
    if model_dir.is_symlink():
        raise ModelRefused(label, "the model folder is a symlink")
    if not model_dir.is_dir():
        raise ModelRefused(label, f"{model_dir} is not a folder")
    out: list[str] = []
    for root, dirs, files in os.walk(model_dir, followlinks=False):
        for name in sorted(dirs + files):
            p = Path(root) / name
            st = p.lstat()
            rel = p.relative_to(model_dir).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise ModelRefused(label, f"{rel} is a symlink")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise ModelRefused(label, f"{rel} is not a regular file")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def build_manifest(model_dir: Path, *, model_id: str, version: str, task: str,
                   intended_use: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Manifest for the folder's current files (refuses pickle files and symlinks); ``base``
    (model_id, version, weights_sha256) for an adapter."""
    files = scan_folder(model_dir)
    bad = [f for f in files if _is_pickle(f)]
    if bad:
        raise ModelRefused(model_id, f"pickle-based file(s) {bad}: convert to safetensors")
    manifest = {
        "model_id": model_id,
        "version": version,
        "task": task,
        "intended_use": intended_use,
        "files": {
            f: hashlib.sha256(_read_nofollow(Path(model_dir) / f)).hexdigest() for f in files
        },
    }
    if base is not None:
        manifest["base"] = {k: str(base[k]) for k in BASE_KEYS}
    validate_manifest(manifest)
    return manifest


def write_manifest(model_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(model_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _base_problem(manifest: dict[str, Any], base: VerifiedModel | None) -> str | None:
    """Why an adapter / base pairing is refused, or None when it is right."""
    rec = manifest.get("base")
    if rec is None:
        return (f"not an adapter: its manifest names no base, but base {base.model_id} was given"
                if base is not None else None)
    if base is None:
        return (f"adapter of base {rec['model_id']} {rec['version']} loaded without its base")
    if base.model_id != rec["model_id"] or base.weights_sha256 != rec["weights_sha256"]:
        return (f"adapter is for base {rec['model_id']} {rec['version']} (weights "
                f"{rec['weights_sha256'][:16]}), not {base.model_id} {base.version} "
                f"(weights {base.weights_sha256[:16]})")
    return None


def _valid_base_record(b: Any) -> bool:
    if not isinstance(b, dict) or any(not isinstance(b.get(k), str) or not b[k]
                                      for k in BASE_KEYS):
        return False
    d = b["weights_sha256"]
    return len(d) == 64 and all(c in "0123456789abcdef" for c in d)


def validate_manifest(m: Any, label: str = "?") -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ModelRefused(label, "manifest is not a JSON object")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise ModelRefused(label, f"manifest lacks {missing}")
    for k in ("model_id", "version", "task", "intended_use"):
        if not isinstance(m[k], str) or not m[k]:
            raise ModelRefused(label, f"manifest {k} must be a non-empty string")
    files = m["files"]
    if not isinstance(files, dict) or not files:
        raise ModelRefused(label, "manifest files must be a non-empty object")
    for rel, digest in files.items():
        if (not isinstance(digest, str) or len(digest) != 64
                or any(c not in "0123456789abcdef" for c in digest)):
            raise ModelRefused(label, f"manifest digest of {rel} is not lowercase SHA-256 hex")
        if rel.startswith("/") or ".." in rel.split("/") or rel == MANIFEST:
            raise ModelRefused(label, f"manifest path {rel!r} is not a plain relative path")
        if _is_pickle(rel):
            raise ModelRefused(
                label, f"{rel} is a pickle-based format; only safetensors is allowed"
            )
    for req in REQUIRED_FILES:
        if req not in files:
            raise ModelRefused(label, f"manifest does not list {req}")
    if not any(f.endswith(WEIGHTS_SUFFIX) for f in files):
        raise ModelRefused(label, "manifest lists no .safetensors weights")
    if "base" in m and not _valid_base_record(m["base"]):
        raise ModelRefused(label, "manifest base must hold model_id, version and the base's "
                                  "weights_sha256 (lowercase SHA-256 hex)")
    try:
        canonical_json(m)
    except TypeError as exc:
        raise ModelRefused(label, f"manifest is not canonicalisable: {exc}") from None
    return m


def weights_digest(file_sha256: dict[str, str]) -> str:
    """Weights digest recorded by jobs: the SHA-256 of the single .safetensors file; with
    several, SHA-256 of the canonical JSON of ``{relpath: sha256}`` over those files."""
    w = {k: v for k, v in file_sha256.items() if k.endswith(WEIGHTS_SUFFIX)}
    if len(w) == 1:
        return next(iter(w.values()))
    return hashlib.sha256(canonical_json(w)).hexdigest()


@dataclass(frozen=True)
class VerifiedModel:
    """A model the gate admitted, with the exact bytes whose digests it checked."""

    model_dir: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    files: dict[str, bytes] = field(repr=False)
    file_sha256: dict[str, str]
    weights_sha256: str
    approver: str
    key_id: str

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def weights(self) -> dict[str, bytes]:
        return {k: v for k, v in self.files.items() if k.endswith(WEIGHTS_SUFFIX)}

    def config(self) -> dict[str, Any]:
        return json.loads(self.files["config.json"])


@dataclass(frozen=True)
class ModelStatus:
    """What ``models list`` shows for a folder."""

    model_dir: Path
    model_id: str
    version: str
    manifest_sha256: str | None
    state: str  # approved | unapproved | revoked | invalid
    detail: str = ""


class ModelGate:
    """Approve, revoke and admit models.

    Parameters
    ----------
    ledger
        where approvals, revocations, loads and refusals are recorded (and read back).
    approvers
        the configured approver keys (``Approver.from_config(settings.audit.approvers)``).
    actor
        ledger actor for events this gate writes (``"component:modelgate"``, ``"user:alice"``).
    """

    def __init__(
        self, ledger: Ledger, approvers: Sequence[Approver], actor: str = "component:modelgate"
    ) -> None:
        self.ledger = ledger
        self.approvers = {a.key_id: a for a in approvers}
        self.actor = actor

    # -- ledger lookups --------------------------------------------------------------
    def _events(self, uid: str, types: Sequence[EventType]) -> list[Event]:
        return [
            e.event for e in self.ledger.query(uids=[uid], event_types=[t.value for t in types])
        ]

    def revoked_keys(self) -> set[str]:
        """Revoked approver keys (a listing; admission decides per key with
        :meth:`is_key_revoked`)."""
        return {str(e.subject.get("key_id")) for e in
                (s.event for s in self.ledger.query(event_types=[EventType.KEY_REVOKED.value]))}

    def is_key_revoked(self, key_id: str) -> bool:
        """Decided from the hashed leaves found through the UID index (the key id is a
        reference of a ``key.revoked`` event), not from the copied event-type column."""
        return any(str(e.subject.get("key_id")) == key_id
                   for e in self._events(key_id, [EventType.KEY_REVOKED]))

    def is_revoked(self, model_id: str, version: str) -> bool:
        return any(e.payload.get("version") == version
                   for e in self._events(model_id, [EventType.MODEL_REVOKED]))

    def _valid_approval(self, manifest: dict[str, Any], digest: str) -> tuple[Approver, str] | str:
        """The first valid approval, or the reason there is none."""
        body = canonical_manifest_bytes(manifest)
        events = [e for e in self._events(manifest["model_id"], [EventType.MODEL_APPROVED])
                  if e.payload.get("manifest_sha256") == digest]
        if not events:
            return "no approval recorded for this manifest (unsigned)"
        reasons = []
        for e in events:
            kid = str(e.payload.get("key_id"))
            approver = self.approvers.get(kid)
            if approver is None:
                reasons.append(f"signed by unknown key {kid}")
                continue
            if self.is_key_revoked(kid):
                reasons.append(f"signed by revoked key {kid} ({approver.name})")
                continue
            try:
                approver.public.verify(base64.b64decode(str(e.payload.get("signature", ""))), body)
            except (InvalidSignature, ValueError):
                reasons.append(f"signature by {kid} does not verify")
                continue
            return approver, kid
        return "; ".join(reasons)

    # -- refusing ---------------------------------------------------------------------
    def _refuse(
        self, label: str, reason: str, model_dir: Path, extra: dict[str, Any] | None = None
    ) -> ModelRefused:
        subject = {"model_id": label}
        payload = {"reason": reason, "folder": Path(model_dir).name, **(extra or {})}
        try:
            self.ledger.append(Event(EventType.MODEL_REFUSED, self.actor, Outcome.SERIOUS_FAILURE,
                                     subject=subject, payload=payload))
        except Exception:
            log.exception("could not record model.refused")
        log.warning("model %s refused: %s", label, reason)
        return ModelRefused(label, reason)

    def _read_checked(
        self, model_dir: Path
    ) -> tuple[dict[str, Any], str, dict[str, bytes], dict[str, str]]:
        """Structure + byte checks; raises ModelRefused (without ledger event)."""
        model_dir = Path(model_dir)
        files_on_disk = scan_folder(model_dir)
        mpath = model_dir / MANIFEST
        label = model_dir.name
        if not mpath.exists():
            raise ModelRefused(label, "no manifest.json")
        try:
            manifest = json.loads(_read_nofollow(mpath))
        except (OSError, ValueError) as exc:
            raise ModelRefused(label, f"manifest.json is unreadable: {exc}") from None
        label = str(manifest.get("model_id", label)) if isinstance(manifest, dict) else label
        validate_manifest(manifest, label)
        pickles = [f for f in files_on_disk if _is_pickle(f)]
        if pickles:
            raise ModelRefused(label, f"pickle-based file(s) present: {pickles}")
        listed = set(manifest["files"])
        added = sorted(set(files_on_disk) - listed)
        removed = sorted(listed - set(files_on_disk))
        if added or removed:
            parts = []
            if added:
                parts.append(f"file(s) not in the manifest: {added}")
            if removed:
                parts.append(f"file(s) missing: {removed}")
            raise ModelRefused(label, "; ".join(parts))
        data: dict[str, bytes] = {}
        digests: dict[str, str] = {}
        for rel in sorted(listed):
            try:
                b = _read_nofollow(model_dir / rel)
            except OSError as exc:
                raise ModelRefused(label, f"cannot read {rel}: {exc}") from None
            d = hashlib.sha256(b).hexdigest()
            if d != manifest["files"][rel]:
                raise ModelRefused(label, f"{rel} differs from the manifest (sha256 {d})")
            data[rel] = b
            digests[rel] = d
        return manifest, manifest_sha256(manifest), data, digests

    # -- API ---------------------------------------------------------------------------
    def load(self, model_dir: Path, base: VerifiedModel | None = None) -> VerifiedModel:
        """Admit a model: verify structure, every byte, approval and revocations.

        An adapter (manifest ``base``) is admitted only with ``base``, the verified base model
        its manifest names (same model id and weights digest); a plain model refuses a base.
        Returns the verified bytes; records ``model.loaded``.

        Raises
        ------
        ModelRefused
            with the reason; a ``model.refused`` event is recorded.
        """
        model_dir = Path(model_dir)
        try:
            manifest, digest, data, digests = self._read_checked(model_dir)
        except ModelRefused as exc:
            raise self._refuse(exc.model, exc.reason, model_dir) from None
        mid, ver = manifest["model_id"], manifest["version"]
        if self.is_revoked(mid, ver):
            raise self._refuse(
                mid, f"version {ver} is revoked", model_dir, {"manifest_sha256": digest}
            )
        approval = self._valid_approval(manifest, digest)
        if isinstance(approval, str):
            raise self._refuse(mid, approval, model_dir, {"manifest_sha256": digest})
        approver, kid = approval
        base_problem = _base_problem(manifest, base)
        if base_problem:
            raise self._refuse(mid, base_problem, model_dir, {"manifest_sha256": digest})
        vm = VerifiedModel(model_dir, manifest, digest, data, digests, weights_digest(digests),
                           approver.name, kid)
        self.ledger.append(Event(EventType.MODEL_LOADED, self.actor, subject={"model_id": mid},
                                 payload={"version": ver, "manifest_sha256": digest,
                                          "weights_sha256": vm.weights_sha256, "key_id": kid,
                                          "approver": approver.name,
                                          **({"base": manifest["base"]} if "base" in manifest
                                             else {})}))
        log.info("model %s %s admitted (weights %s)", mid, ver, vm.weights_sha256[:16])
        return vm

    def load_with_base(
        self, model_dir: Path, models_dir: Path | None = None
    ) -> tuple[VerifiedModel, VerifiedModel | None]:
        """:meth:`load` for a plain model or an adapter: an adapter's base (its manifest's
        ``base``) is the folder under ``models_dir`` (default: the adapter's parent) whose
        manifest has that model id and weights digest, loaded first (refused when none).
        Returns ``(model, base or None)``."""
        model_dir = Path(model_dir)
        try:
            rec = json.loads(_read_nofollow(model_dir / MANIFEST)).get("base")
        except (OSError, ValueError, AttributeError):
            rec = None  # load() refuses the folder with the reason
        if not isinstance(rec, dict):
            return self.load(model_dir), None
        root = Path(models_dir) if models_dir is not None else model_dir.parent
        found = None
        for folder in self.folders(root):
            try:
                m = json.loads(_read_nofollow(folder / MANIFEST))
            except (OSError, ValueError):
                continue
            if m.get("model_id") == rec.get("model_id"):
                found = found or folder
                if weights_digest(m.get("files", {})) == rec.get("weights_sha256"):
                    found = folder
                    break
        if found is None:
            raise self._refuse(str(rec.get("model_id")), f"base of adapter {model_dir.name} "
                               f"not found under {root}", model_dir)
        base = self.load(found)
        return self.load(model_dir, base=base), base

    def verify(self, model_dir: Path) -> VerifiedModel:
        """Like :meth:`load` (same checks and events); used by ``models verify``."""
        return self.load(model_dir)

    def approve(
        self, model_dir: Path, key: Ed25519PrivateKey, approver_name: str | None = None
    ) -> dict[str, Any]:
        """Sign the folder's manifest with ``key`` and record ``model.approved``.

        The folder must match its manifest byte for byte. The key should be a configured
        approver (otherwise the approval is recorded but :meth:`load` will not accept it).
        """
        manifest, digest, _data, _ = self._read_checked(Path(model_dir))
        mid, ver = manifest["model_id"], manifest["version"]
        if self.is_revoked(mid, ver):
            raise ModelRefused(mid, f"version {ver} is revoked; approve a new version")
        kid = key_fingerprint(key.public_key())
        if self.is_key_revoked(kid):
            raise ModelRefused(mid, f"key {kid} is revoked")
        name = approver_name or (self.approvers[kid].name if kid in self.approvers else kid)
        sig = key.sign(canonical_manifest_bytes(manifest))
        payload = {"version": ver, "manifest_sha256": digest, "key_id": kid, "approver": name,
                   "public_key": public_key_b64(key.public_key()),
                   "signature": base64.b64encode(sig).decode(), "task": manifest["task"]}
        self.ledger.append(Event(EventType.MODEL_APPROVED, self.actor, subject={"model_id": mid},
                                 payload=payload))
        if kid not in self.approvers:
            log.warning(
                "approval by key %s recorded, but that key is not a configured approver", kid
            )
        return payload

    def revoke(self, model_id: str, version: str, reason: str) -> None:
        """Revoke one model version (permanent; a ``model.revoked`` event)."""
        self.ledger.append(
            Event(
                EventType.MODEL_REVOKED,
                self.actor,
                subject={"model_id": model_id},
                payload={"version": version, "reason": reason},
            )
        )

    def revoke_key(self, key_id: str, reason: str) -> None:
        """Revoke an approver key: its approvals stop counting (a ``key.revoked`` event)."""
        name = self.approvers[key_id].name if key_id in self.approvers else None
        self.ledger.append(Event(EventType.KEY_REVOKED, self.actor, subject={"key_id": key_id},
                                 payload={"approver": name, "reason": reason}))

    def status(self, model_dir: Path) -> ModelStatus:
        """State of a folder without recording anything."""
        model_dir = Path(model_dir)
        try:
            manifest, digest, _d, _ = self._read_checked(model_dir)
        except ModelRefused as exc:
            return ModelStatus(model_dir, exc.model, "?", None, "invalid", exc.reason)
        mid, ver = manifest["model_id"], manifest["version"]
        if self.is_revoked(mid, ver):
            return ModelStatus(model_dir, mid, ver, digest, "revoked")
        approval = self._valid_approval(manifest, digest)
        if isinstance(approval, str):
            return ModelStatus(model_dir, mid, ver, digest, "unapproved", approval)
        return ModelStatus(
            model_dir, mid, ver, digest, "approved", f"by {approval[0].name} ({approval[1]})"
        )

    @staticmethod
    def folders(models_dir: Path) -> list[Path]:
        """Model folders under ``models_dir`` (those holding a manifest.json)."""
        root = Path(models_dir)
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).exists())
