"""Installing a bundle on a vehicle: verified into a new slot, smoke-tested, then switched to atomically.

Layout under the install root, per model name:

    <root>/<name>/slots/v<version>-<stamp>/   verified folder bundles (manifest, signature, engines)
    <root>/<name>/active   -> slots/...       what `edge run <root>/<name>/active` runs
    <root>/<name>/previous -> slots/...       what `edge rollback` switches back to
    <root>/<name>/install.log                 one JSON line per install, refusal, downgrade and rollback

Steps: verify into `<root>/.incoming-*` (nothing outside it is written before the signature checks), refuse a
version not newer than any installed one (anti-rollback; `allow_downgrade` with a logged reason overrides),
load the engine and run one inference, move the folder into `slots/`, point `previous` at the current slot,
then replace `active` with one `rename` (atomic on POSIX). A crash at any step leaves `active` on the bundle that
was running; leftovers of a crashed install are removed by the next one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge.manifest import MANIFEST, BundleInstallError, BundleRollbackError, Manifest, parse_manifest
from edge.runner import select_engine
from edge.verify import VerifiedBundle, verify_bundle

ACTIVE, PREVIOUS, SLOTS, LOG = "active", "previous", "slots", "install.log"
INCOMING_PREFIX = ".incoming-"
#: the install steps, in order; `on_step` is called after each (a test kills the installer there)
STEPS = ("verified", "version_checked", "smoke_tested", "staged", "previous_kept", "switched")


def installed(root: str | Path, name: str) -> Manifest | None:
    """The manifest of the active bundle of `name` under `root`, or None."""
    active = Path(root) / name / ACTIVE
    return parse_manifest((active / MANIFEST).read_bytes()) if active.exists() else None


def install_bundle(
    bundle: str | Path, public_key: str | Path, root: str | Path, *, allow_downgrade: str | None = None,
    on_step: Callable[[str], None] = lambda step: None,
) -> dict:
    """Install `bundle` under `root` and make it active; returns what was done. `allow_downgrade`: the reason
    (logged) for installing a version that is not newer than an installed one; without it that is refused."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    incoming = root / f"{INCOMING_PREFIX}{uuid.uuid4().hex}"
    try:
        with verify_bundle(bundle, public_key, into=incoming) as verified:
            on_step("verified")
            home = root / verified.manifest.name
            _check_version(home, verified.manifest, allow_downgrade)
            on_step("version_checked")
            _smoke_test(verified)
            on_step("smoke_tested")
            slot = _stage(incoming, home, verified.manifest)
            on_step("staged")
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    before = _target(home / ACTIVE)
    if before is not None:
        _point(home, PREVIOUS, before)
    on_step("previous_kept")
    _point(home, ACTIVE, slot)
    on_step("switched")
    record = {"event": "installed", "name": verified.manifest.name, "version": verified.manifest.version,
              "slot": slot.name, "previous": before.name if before else None, "bundle": str(bundle),
              **({"downgrade_reason": allow_downgrade} if allow_downgrade else {})}
    _log(home, record)
    return record


def rollback(root: str | Path, name: str) -> dict:
    """Switch `name` back to its previous slot (and keep the one it leaves as the new previous)."""
    home = Path(root) / name
    current, previous = _target(home / ACTIVE), _target(home / PREVIOUS)
    if current is None or previous is None or not previous.is_dir():
        raise BundleInstallError(f"nothing to roll back to for {name!r} under {root}: no previous slot")
    _point(home, ACTIVE, previous)
    _point(home, PREVIOUS, current)
    record = {"event": "rolled_back", "name": name, "slot": previous.name, "left": current.name}
    _log(home, record)
    return record


def _remove_leftovers(root: Path) -> None:
    for stale in root.glob(f"{INCOMING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f"*/.{ACTIVE}.*"):
        stale.unlink(missing_ok=True)
    for stale in root.glob(f"*/.{PREVIOUS}.*"):
        stale.unlink(missing_ok=True)


def _check_version(home: Path, manifest: Manifest, allow_downgrade: str | None) -> None:
    """Refuse a version not newer than every installed one (kept slots count: a rollback does not reopen the gap)."""
    versions = [parse_manifest((slot / MANIFEST).read_bytes()).version
                for slot in sorted((home / SLOTS).glob("*")) if (slot / MANIFEST).is_file()]
    newest = max(versions, default=0)
    if manifest.version > newest:
        return
    if allow_downgrade is not None and not allow_downgrade.strip():
        raise ValueError("allow_downgrade needs a reason (it is logged)")
    if allow_downgrade is None:
        _log(home, {"event": "refused", "name": manifest.name, "version": manifest.version, "newest": newest})
        raise BundleRollbackError(f"{manifest.name} version {manifest.version} is not newer than the installed "
                                  f"version {newest}: refused (a replayed older bundle); to downgrade on purpose, "
                                  "allow it with a reason")


def _smoke_test(verified: VerifiedBundle) -> None:
    """The engine this vehicle would run loads and segments one frame of the model's size into valid labels."""
    spec = verified.manifest.spec
    height, width = spec.input_size
    try:
        engine = select_engine(verified)
        labels = engine.segment(np.zeros((height, width, 3), np.uint8))[0]
    except Exception as exc:  # any failure to load or run is a reason not to switch
        raise BundleInstallError(f"{verified.manifest.name}: its engine failed the smoke inference: "
                                 f"{type(exc).__name__}: {exc}") from exc
    if labels.shape != (height, width) or int(labels.max()) >= spec.num_classes or int(labels.min()) < 0:
        raise BundleInstallError(f"{verified.manifest.name}: the smoke inference gave labels of shape "
                                 f"{labels.shape} in [{labels.min()}, {labels.max()}], expected {(height, width)} "
                                 f"in [0, {spec.num_classes - 1}]")


def _stage(incoming: Path, home: Path, manifest: Manifest) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    slot = home / SLOTS / f"v{manifest.version}-{stamp}-{uuid.uuid4().hex[:6]}"
    slot.parent.mkdir(parents=True, exist_ok=True)
    for file in incoming.iterdir():  # on disk before anything points at it: a power cut must not leave half a slot
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _sync_folder(incoming)
    os.rename(incoming, slot)
    _sync_folder(slot.parent)
    return slot


def _target(link: Path) -> Path | None:
    return link.parent / os.readlink(link) if link.is_symlink() else None


def _point(home: Path, name: str, slot: Path) -> None:
    """Make home/name a link to `slot` with one rename: readers see the old slot or the new, never neither."""
    temporary = home / f".{name}.{uuid.uuid4().hex}"
    os.symlink(os.path.relpath(slot, home), temporary)
    os.replace(temporary, home / name)
    _sync_folder(home)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _log(home: Path, record: dict) -> None:
    home.mkdir(parents=True, exist_ok=True)
    stamped = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
    with open(home / LOG, "a") as log:
        log.write(json.dumps(stamped) + "\n")
        log.flush()
        os.fsync(log.fileno())
