"""Making signed edge bundles: what a vehicle receives.

A bundle is a folder (or a .tar.gz of one) holding the gated engine files (ONNX graphs, TensorRT plans with
their target sidecars), `manifest.json` (ModelSpec, model name and version, each file's SHA-256 and size, parity
figures, plan targets, library versions, creation time, signer key id) and `manifest.sig`, an ECDSA P-256 signature
over the manifest's exact bytes. Since every file's digest is in the signed manifest, one signature covers all.
`model.sig` signs the same folder again in the OpenSSF model-signing format, for the stock verifier.
An archive puts the manifest and its signature first, so a vehicle checks them before reading anything else
(`edge.verify`).
"""

from __future__ import annotations

import platform
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edge.manifest import MANIFEST, SIGNATURE, BundleError, BundleFile, BundleMissingFileError, Manifest
from edge.model_signature import MODEL_SIGNATURE, sign_folder
from edge.signing import key_id, load_private_key, sign
from edge.verify import ARCHIVE_SUFFIXES
from export.onnx_export import model_metadata
from export.pipeline import read_parity
from export.tensorrt_engine import read_plan_info, sidecar_path
from segmenters.files import atomic_write
from segmenters.spec import ModelSpec, file_digest

PARITY_FIELDS = ("source", "images", "max_abs", "median_abs", "max_abs_rel", "label_agreement", "miou")


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("patchwatch", "torch", "onnx", "onnxruntime", "tensorrt"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def create_bundle(
    out: str | Path, engine_files: list[str | Path], private_key: str | Path, name: str | None = None,
    version: int = 1,
) -> Path:
    """Copy gated engine files into `out` (a folder, or a `.tar.gz` archive path), write and sign the manifest.

    Every engine must have its parity report (it went through the gate) and all must be the same model.
    `version`: this model's release number; vehicles refuse one that is not newer than what they run.
    """
    if not engine_files:
        raise BundleError("a bundle needs at least one engine file (.onnx or .plan)")
    key = load_private_key(private_key)
    out = Path(out)
    archive = out.name.endswith(ARCHIVE_SUFFIXES)
    staging = Path(tempfile.mkdtemp(prefix="patchwatch-bundle-")) if archive else out
    if not archive:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
    try:
        spec, entries = _stage_engines(staging, engine_files)
        manifest = Manifest(
            name=name or f"{spec.arch}-{spec.dataset}",
            version=version,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            spec=spec,
            files=tuple(entries),
            versions=_versions(),
            signer=key_id(key.public_key()),
        )
        manifest_bytes = manifest.model_dump_json(indent=2).encode()
        (staging / MANIFEST).write_bytes(manifest_bytes)
        (staging / SIGNATURE).write_bytes(sign(key, manifest_bytes))
        sign_folder(staging, private_key)  # model.sig: the same files, in the OpenSSF model-signing format
        if archive:
            _write_archive(out, staging, entries)
    finally:
        if archive:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _stage_engines(staging: Path, engine_files: list[str | Path]) -> tuple[ModelSpec, list[BundleFile]]:
    """Copy each gated engine (and a plan's sidecar) into `staging`; the one model's spec and the file entries."""
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
    return spec, entries


def _write_archive(out: Path, staging: Path, entries: list[BundleFile]) -> None:
    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w:gz") as tar:  # manifest and signature first: checked before the rest
            for item_name in [MANIFEST, SIGNATURE] + [e.path for e in entries] + [MODEL_SIGNATURE]:
                tar.add(staging / item_name, arcname=item_name)

    atomic_write(out, write)


def _add(staging: Path, source: Path, role: str, **fields) -> BundleFile:
    target = staging / source.name
    shutil.copyfile(source, target)
    return BundleFile(path=source.name, role=role, sha256=file_digest(target), size=target.stat().st_size, **fields)
