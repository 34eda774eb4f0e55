"""Signed edge bundles: what a vehicle receives, and the checks it makes before running anything.

A bundle is a folder (or a .tar.gz of one) holding the gated engine files (ONNX graphs, TensorRT plans with
their target sidecars), `manifest.json` (ModelSpec, each file's SHA-256 and size, parity figures, plan
targets, library versions, creation time, signer key id) and `manifest.sig`, an Ed25519 signature over the
manifest's exact bytes. Since every file's digest is in the signed manifest, one signature covers all.

`verify_bundle` refuses, each with its own error: an unreadable manifest, a key other than the signer's,
a manifest whose signature does not check, a missing file, a changed file, a file the manifest does not
list, and a TensorRT plan built for another TensorRT release or GPU than the target.
"""

from __future__ import annotations

import json
import platform
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel, ValidationError

from edge.signing import key_id, load_private_key, load_public_key, sign, signature_valid
from export.onnx_export import model_metadata
from export.pipeline import read_parity
from export.tensorrt_engine import PlanTarget, current_target, read_plan_info, sidecar_path
from segmenters.files import atomic_write
from segmenters.spec import ModelSpec, file_digest

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
BUNDLE_FORMAT = 1
PARITY_FIELDS = ("source", "images", "max_abs", "median_abs", "max_abs_rel", "label_agreement", "miou")


class BundleError(Exception):
    """A bundle cannot be trusted or used; subclasses say why."""


class BundleFormatError(BundleError): ...


class BundleKeyError(BundleError): ...


class BundleSignatureError(BundleError): ...


class BundleMissingFileError(BundleError): ...


class BundleDigestError(BundleError): ...


class BundleUnexpectedFileError(BundleError): ...


class BundleTargetError(BundleError): ...


class BundleFile(BaseModel):
    path: str
    role: str  # onnx | tensorrt | plan_info
    sha256: str
    size: int
    precision: str | None = None
    parity: dict | None = None
    target: PlanTarget | None = None


class Manifest(BaseModel):
    format: int = BUNDLE_FORMAT
    name: str
    created_at: str
    spec: ModelSpec
    files: list[BundleFile]
    versions: dict[str, str]
    signer: str

    def engines(self, role: str | None = None) -> list[BundleFile]:
        return [f for f in self.files if f.role in ("onnx", "tensorrt") and (role is None or f.role == role)]


class VerifiedBundle:
    """A bundle that passed every check; `root` is its folder (a temporary one for archives)."""

    def __init__(self, root: Path, manifest: Manifest, unchecked_plans: list[str], cleanup: Path | None = None):
        self.root, self.manifest, self.unchecked_plans, self._cleanup = root, manifest, unchecked_plans, cleanup

    def path(self, entry: BundleFile) -> Path:
        return self.root / entry.path

    def close(self) -> None:
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None

    def __enter__(self) -> VerifiedBundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("patchwatch", "torch", "onnx", "onnxruntime", "tensorrt"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def create_bundle(
    out: str | Path, engine_files: list[str | Path], private_key: str | Path, name: str | None = None
) -> Path:
    """Copy gated engine files into `out` (a folder, or a `.tar.gz` archive path), write and sign the manifest.

    Every engine must have its parity report (it went through the gate) and all must be the same model.
    """
    if not engine_files:
        raise BundleError("a bundle needs at least one engine file (.onnx or .plan)")
    key = load_private_key(private_key)
    out = Path(out)
    archive = out.name.endswith((".tar.gz", ".tgz"))
    staging = Path(tempfile.mkdtemp(prefix="patchwatch-bundle-")) if archive else out
    if not archive:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
    try:
        spec, entries = None, []
        for source in map(Path, engine_files):
            if not source.is_file():
                raise BundleMissingFileError(f"engine file not found: {source}")
            parity = read_parity(source)
            if not parity.passed:
                raise BundleError(f"{source} failed its parity gate: {'; '.join(parity.failures)}")
            figures = {k: getattr(parity, k) for k in PARITY_FIELDS}
            if source.suffix.lower() == ".onnx":
                file_spec, precision = model_metadata(source)
                entries.append(_add(staging, source, "onnx", precision=precision, parity=figures))
            elif source.suffix.lower() in (".plan", ".engine"):
                info = read_plan_info(source)
                file_spec = info.spec
                entries.append(_add(staging, source, "tensorrt", precision=info.precision, parity=figures,
                                    target=info.target))
                entries.append(_add(staging, sidecar_path(source), "plan_info"))
            else:
                raise BundleError(f"{source}: not an engine file (expected .onnx or .plan)")
            if spec is not None and file_spec.checkpoint_digest != spec.checkpoint_digest:
                raise BundleError(f"{source} comes from other weights than {engine_files[0]}; one model per bundle")
            spec = spec or file_spec
        names = [e.path for e in entries]
        if len(set(names)) != len(names):
            raise BundleError(f"two engine files share a name: {names}")
        manifest = Manifest(
            name=name or f"{spec.arch}-{spec.dataset}",
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            spec=spec,
            files=entries,
            versions=_versions(),
            signer=key_id(key.public_key()),
        )
        manifest_bytes = manifest.model_dump_json(indent=2).encode()
        (staging / MANIFEST).write_bytes(manifest_bytes)
        (staging / SIGNATURE).write_bytes(sign(key, manifest_bytes))
        if archive:
            def write(tmp: str) -> None:
                with tarfile.open(tmp, "w:gz") as tar:
                    for item in sorted(staging.iterdir()):
                        tar.add(item, arcname=item.name)
            atomic_write(out, write)
    finally:
        if archive:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _add(staging: Path, source: Path, role: str, **fields) -> BundleFile:
    target = staging / source.name
    shutil.copyfile(source, target)
    return BundleFile(path=source.name, role=role, sha256=file_digest(target), size=target.stat().st_size, **fields)


CURRENT_MACHINE = object()  # verify_bundle default: check plans against this machine


def verify_bundle(
    path: str | Path, public_key: str | Path, *, target: PlanTarget | None | object = CURRENT_MACHINE
) -> VerifiedBundle:
    """Check a bundle; returns it open (use as a context manager) or raises a `BundleError` subclass.

    `target`: the TensorRT release and GPU the plans must fit; by default this machine's (None where it has
    no TensorRT: plans are then listed as unchecked, and only the ONNX engines are usable here).
    """
    path = Path(path)
    cleanup = None
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        cleanup = Path(tempfile.mkdtemp(prefix="patchwatch-verify-"))
        try:
            with tarfile.open(path, "r:gz") as tar:
                tar.extractall(cleanup, filter="data")  # refuses absolute paths, links out, devices
        except (tarfile.TarError, OSError, EOFError) as exc:
            shutil.rmtree(cleanup, ignore_errors=True)
            raise BundleFormatError(f"{path} is not a readable bundle archive: {exc}") from exc
        root = cleanup
    elif path.is_dir():
        root = path
    else:
        raise BundleFormatError(f"no bundle at {path} (expected a folder or a .tar.gz)")
    try:
        manifest, unchecked = _verify(root, public_key, current_target() if target is CURRENT_MACHINE else target)
    except BaseException:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    return VerifiedBundle(root, manifest, unchecked, cleanup)


def _verify(root: Path, public_key_path: str | Path, target: PlanTarget | None) -> tuple[Manifest, list[str]]:
    manifest_path, signature_path = root / MANIFEST, root / SIGNATURE
    for required in (manifest_path, signature_path):
        if not required.is_file():
            raise BundleMissingFileError(f"bundle has no {required.name}: not a signed patchwatch bundle")
    manifest_bytes = manifest_path.read_bytes()
    key = load_public_key(public_key_path)
    # Read the signer id before trusting anything else, only to name a wrong key as such.
    try:
        claimed_signer = json.loads(manifest_bytes).get("signer")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        claimed_signer = None
    if claimed_signer is not None and claimed_signer != key_id(key):
        raise BundleKeyError(
            f"bundle was signed by key {claimed_signer}, but the key given ({public_key_path}) is {key_id(key)}"
        )
    if not signature_valid(key, signature_path.read_bytes(), manifest_bytes):
        raise BundleSignatureError("manifest signature does not verify: the manifest or its signature was altered")
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as exc:
        raise BundleFormatError(f"signed manifest does not parse as bundle format {BUNDLE_FORMAT}: {exc}") from exc
    if manifest.format != BUNDLE_FORMAT:
        raise BundleFormatError(f"bundle format {manifest.format}, this patchwatch reads format {BUNDLE_FORMAT}")

    listed = {f.path for f in manifest.files} | {MANIFEST, SIGNATURE}
    extra = sorted(p.name for p in root.iterdir() if p.name not in listed)
    if extra:
        raise BundleUnexpectedFileError(f"bundle holds files its manifest does not list: {extra}")
    for entry in manifest.files:
        file = root / entry.path
        if Path(entry.path).name != entry.path:
            raise BundleFormatError(f"manifest names a file outside the bundle folder: {entry.path!r}")
        if not file.is_file():
            raise BundleMissingFileError(f"bundle file missing: {entry.path}")
        size, digest = file.stat().st_size, file_digest(file)
        if size != entry.size or digest != entry.sha256:
            raise BundleDigestError(
                f"bundle file changed: {entry.path} has {digest} ({size} bytes), the signed manifest says "
                f"{entry.sha256} ({entry.size} bytes)"
            )
    for entry in manifest.engines("onnx"):
        spec, _ = model_metadata(root / entry.path)
        if spec != manifest.spec:
            raise BundleFormatError(f"{entry.path} carries a ModelSpec different from the manifest's")

    unchecked = []
    for entry in manifest.engines("tensorrt"):
        if target is None:
            unchecked.append(entry.path)
            continue
        why = entry.target.mismatch(target) if entry.target else "the manifest records no target for it"
        if why:
            raise BundleTargetError(f"TensorRT plan {entry.path} cannot run on this target: {why}")
    return manifest, unchecked
