"""Verifying a bundle before anything of it is unpacked, and loading only what was verified.

An archive is read as a stream: its first two members must be `manifest.json` and `manifest.sig` (each read
into memory under a small cap), and the signature is checked before any other member is looked at. Then each
member must be listed, a regular file, not seen before and exactly the signed size (compared on its header,
before a byte of it is read); it is streamed into a private folder with its size as a cap and hashed on the
way. Decompressed bytes are capped too (the manifest's total plus a per-member allowance for tar headers), so
neither a decompression bomb nor a flood of members costs more than reading a bounded prefix.

A folder bundle is copied the same way into a private folder (each file opened without following links, and
refused unless it is a regular file), so what was hashed is what is loaded: swapping a file after the check
changes nothing. `VerifiedBundle.root` is always that private copy.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from edge.manifest import (
    MANIFEST, MANIFEST_MAX_BYTES, SIGNATURE, SIGNATURE_MAX_BYTES, BundleDigestError, BundleDuplicateError,
    BundleError, BundleFile, BundleFormatError, BundleKeyError, BundleMemberTypeError, BundleMissingFileError,
    BundleSignatureError, BundleSizeError, BundleTargetError, BundleUnexpectedFileError, Manifest, claimed_signer,
    parse_manifest,
)
from edge.model_signature import MODEL_SIGNATURE, MODEL_SIGNATURE_MAX_BYTES
from edge.signing import key_id, load_public_key, signature_valid
from export.onnx_export import model_metadata
from export.tensorrt_engine import PlanTarget, current_target

#: decompressed bytes allowed per archive member beyond its data: its 512-byte header, padding, a PAX header
MEMBER_OVERHEAD_BYTES = 64 * 1024
#: and once per archive: the end-of-archive blocks and the record padding after them
ARCHIVE_END_BYTES = 64 * 1024
COPY_CHUNK_BYTES = 1 << 20
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")

CURRENT_MACHINE = object()  # verify_bundle default: check plans against this machine


class VerifiedBundle:
    """A bundle that passed every check; `root` is the private folder holding exactly the verified bytes."""

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


def verify_bundle(
    path: str | Path, public_key: str | Path, *, target: PlanTarget | None | object = CURRENT_MACHINE,
    into: str | Path | None = None,
) -> VerifiedBundle:
    """Check a bundle and copy what was verified into a private folder; returns it open (a context manager that
    removes the copy) or raises a `BundleError` subclass, leaving nothing behind.

    `target`: the TensorRT release and GPU the plans must fit; by default this machine's (None where it has no
    TensorRT: plans are then listed as unchecked, and only the ONNX engines are usable here).
    `into`: a folder to create and keep the verified copy in (an installer's new slot) instead of a temporary one.
    """
    path = Path(path)
    if not (path.is_dir() or (path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES))):
        raise BundleFormatError(f"no bundle at {path} (expected a folder or a {' / '.join(ARCHIVE_SUFFIXES)} archive)")
    key = load_public_key(public_key)  # a missing key file is the caller's error, before anything is created
    dest = _private_folder(into)
    try:
        manifest = (_copy_archive if path.is_file() else _copy_folder)(path, key, public_key, dest)
        _check_engines(dest, manifest)
        unchecked = _check_plans(manifest, current_target() if target is CURRENT_MACHINE else target)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return VerifiedBundle(dest, manifest, unchecked, cleanup=None if into is not None else dest)


def _private_folder(into: str | Path | None) -> Path:
    if into is None:
        return Path(tempfile.mkdtemp(prefix="patchwatch-verify-"))  # mode 0700
    folder = Path(into)
    folder.mkdir(mode=0o700, parents=False, exist_ok=False)
    return folder


def _authenticate(manifest_bytes: bytes, signature: bytes, key, key_path) -> Manifest:
    """The signature first; only a manifest it covers is parsed (strictly)."""
    claimed = claimed_signer(manifest_bytes)
    if claimed is not None and claimed != key_id(key):
        raise BundleKeyError(f"bundle was signed by key {claimed}, but the key given ({key_path}) is {key_id(key)}")
    if not signature_valid(key, signature, manifest_bytes):
        raise BundleSignatureError("manifest signature does not verify: the manifest or its signature was altered")
    return parse_manifest(manifest_bytes)


def _keep_signed(dest: Path, manifest_bytes: bytes, signature: bytes) -> None:
    """The verified copy is itself a folder bundle (an installed slot is run, and verified, as one)."""
    _keep(dest, MANIFEST, manifest_bytes)
    _keep(dest, SIGNATURE, signature)


def _keep(dest: Path, name: str, data: bytes) -> None:
    fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


class _CappedReader:
    """A read-only stream that refuses to deliver more than `limit` bytes in all (decompressed, for archives)."""

    def __init__(self, raw: BinaryIO, limit: int):
        self.raw, self.limit, self.consumed = raw, limit, 0

    def read(self, size: int = -1) -> bytes:
        allowed = self.limit - self.consumed
        data = self.raw.read(allowed + 1 if size is None or size < 0 else min(size, allowed + 1))
        self.consumed += len(data)
        if self.consumed > self.limit:
            raise BundleSizeError(f"the archive holds more than the {self.limit} bytes its signed manifest accounts "
                                  "for: refused without reading further")
        return data


def _copy_archive(path: Path, key, key_path, dest: Path) -> Manifest:
    with open(path, "rb") as raw:
        stream = _CappedReader(gzip.GzipFile(fileobj=raw, mode="rb"),
                               MANIFEST_MAX_BYTES + SIGNATURE_MAX_BYTES + 2 * MEMBER_OVERHEAD_BYTES)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
            manifest_bytes = _first_member(tar, MANIFEST, MANIFEST_MAX_BYTES, position="first")
            signature = _first_member(tar, SIGNATURE, SIGNATURE_MAX_BYTES, position="second")
            manifest = _authenticate(manifest_bytes, signature, key, key_path)
            _keep_signed(dest, manifest_bytes, signature)
            stream.limit += (manifest.total_size + MODEL_SIGNATURE_MAX_BYTES
                             + (len(manifest.files) + 1) * MEMBER_OVERHEAD_BYTES + ARCHIVE_END_BYTES)
            _copy_members(tar, manifest, dest)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            raise BundleFormatError(f"{path} is not a readable bundle archive: {type(exc).__name__}: {exc}") from exc
    return manifest


def _first_member(tar: tarfile.TarFile, name: str, cap: int, position: str) -> bytes:
    member = tar.next()
    if member is None or member.name != name:
        found = "nothing" if member is None else repr(member.name)
        raise BundleMissingFileError(f"bundle has no {name} as its {position} member (found {found}): not a signed "
                                     "patchwatch bundle, refused before reading further")
    if not member.isreg() or member.issparse():
        raise BundleMemberTypeError(f"{name} in the archive is not a regular file")
    if member.size > cap:
        raise BundleSizeError(f"{name} declares {member.size} bytes, over the {cap} a bundle's {name} may hold")
    with tar.extractfile(member) as handle:
        return handle.read()


def _copy_members(tar: tarfile.TarFile, manifest: Manifest, dest: Path) -> None:
    seen = {MANIFEST, SIGNATURE}
    while (member := tar.next()) is not None:
        if member.name in seen:
            raise BundleDuplicateError(f"the archive holds {member.name!r} twice: refused (which copy is checked and "
                                       "which is used would depend on the unpacker)")
        if member.name == MODEL_SIGNATURE:  # not in the manifest (it signs the manifest too): copied, capped
            seen.add(member.name)
            _copy_model_signature(tar, member, dest)
            continue
        entry = manifest.entry(member.name)
        if entry is None:
            raise BundleUnexpectedFileError(f"bundle holds a file its manifest does not list: {member.name!r}")
        if not member.isreg() or member.issparse():
            raise BundleMemberTypeError(f"{member.name} is a {_tar_kind(member)} in the archive, not a regular file")
        if member.size != entry.size:
            raise BundleSizeError(f"{member.name} is {member.size} bytes in the archive, the signed manifest says "
                                  f"{entry.size}: refused before reading it")
        seen.add(member.name)
        with tar.extractfile(member) as handle:
            _copy_verified(handle, dest, entry)
    _refuse_missing(manifest, seen)


def _copy_model_signature(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    if not member.isreg() or member.issparse():
        raise BundleMemberTypeError(f"{member.name} is a {_tar_kind(member)} in the archive, not a regular file")
    if member.size > MODEL_SIGNATURE_MAX_BYTES:
        raise BundleSizeError(f"{member.name} declares {member.size} bytes, over the {MODEL_SIGNATURE_MAX_BYTES} "
                              "it may hold")
    with tar.extractfile(member) as handle:
        _keep(dest, member.name, handle.read(MODEL_SIGNATURE_MAX_BYTES + 1))


def _tar_kind(member: tarfile.TarInfo) -> str:
    kinds = (("symbolic link", member.issym()), ("hard link", member.islnk()), ("directory", member.isdir()),
             ("device", member.isdev()), ("sparse file", member.issparse()))
    return next((kind for kind, it in kinds if it), "special member")


def _refuse_missing(manifest: Manifest, seen: set[str]) -> None:
    missing = [f.path for f in manifest.files if f.path not in seen]
    if missing:
        raise BundleMissingFileError(f"bundle file missing: {', '.join(missing)}")


def _copy_verified(source: BinaryIO, dest: Path, entry: BundleFile) -> None:
    """Stream `source` into dest/entry.path, never more than the signed size, hashing what was written."""
    sha, written = hashlib.sha256(), 0
    fd = os.open(dest / entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(min(COPY_CHUNK_BYTES, entry.size - written + 1)):
            written += len(chunk)
            if written > entry.size:
                raise BundleSizeError(f"{entry.path} holds more than the {entry.size} bytes the signed manifest says")
            sha.update(chunk)
            out.write(chunk)
    digest = "sha256:" + sha.hexdigest()
    if written != entry.size or digest != entry.sha256:
        raise BundleDigestError(f"bundle file changed: {entry.path} has {digest} ({written} bytes), the signed "
                                f"manifest says {entry.sha256} ({entry.size} bytes)")


def _open_regular(path: Path, cap: int | None = None) -> tuple[int, int]:
    """(fd, size) of a regular file opened without following a link; refuses links, FIFOs, devices, folders."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # non-blocking: a FIFO must not hang us
    except FileNotFoundError as exc:
        raise BundleMissingFileError(f"bundle file missing: {path.name}") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleMemberTypeError(f"{path.name} is a symbolic link: a bundle holds regular files only") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise BundleMemberTypeError(f"{path.name} is not a regular file (mode {stat.filemode(info.st_mode)})")
    if cap is not None and info.st_size > cap:
        os.close(fd)
        raise BundleSizeError(f"{path.name} is {info.st_size} bytes, over the {cap} it may hold")
    return fd, info.st_size


def _read_small(path: Path, cap: int) -> bytes:
    fd, _ = _open_regular(path, cap)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(cap + 1)
    if len(data) > cap:
        raise BundleSizeError(f"{path.name} grew past the {cap} bytes it may hold while being read")
    return data


def _copy_folder(root: Path, key, key_path, dest: Path) -> Manifest:
    manifest_bytes, signature = _read_small(root / MANIFEST, MANIFEST_MAX_BYTES), _read_small(root / SIGNATURE,
                                                                                            SIGNATURE_MAX_BYTES)
    manifest = _authenticate(manifest_bytes, signature, key, key_path)
    _keep_signed(dest, manifest_bytes, signature)
    known = (MANIFEST, SIGNATURE, MODEL_SIGNATURE)
    unlisted = sorted(n for n in os.listdir(root) if n not in known and manifest.entry(n) is None)
    if unlisted:
        raise BundleUnexpectedFileError(f"bundle holds files its manifest does not list: {unlisted}")
    for entry in manifest.files:
        fd, size = _open_regular(root / entry.path)
        with os.fdopen(fd, "rb") as handle:
            if size != entry.size:
                raise BundleSizeError(f"{entry.path} is {size} bytes, the signed manifest says {entry.size}: "
                                      "refused before reading it")
            _copy_verified(handle, dest, entry)
    if os.path.lexists(root / MODEL_SIGNATURE):
        _keep(dest, MODEL_SIGNATURE, _read_small(root / MODEL_SIGNATURE, MODEL_SIGNATURE_MAX_BYTES))
    return manifest


def _check_engines(root: Path, manifest: Manifest) -> None:
    for entry in manifest.engines("onnx"):
        spec, _ = model_metadata(root / entry.path)
        if spec != manifest.spec:
            raise BundleFormatError(f"{entry.path} carries a ModelSpec different from the manifest's")


def _check_plans(manifest: Manifest, target: PlanTarget | None) -> list[str]:
    unchecked = []
    for entry in manifest.engines("tensorrt"):
        if target is None:
            unchecked.append(entry.path)
            continue
        why = entry.target.mismatch(target) if entry.target else "the manifest records no target for it"
        if why:
            raise BundleTargetError(f"TensorRT plan {entry.path} cannot run on this target: {why}")
    return unchecked
