"""Shipping bundles safely: hostile archives and folders refused before unpacking, each with its own error class;
strict signed manifests; install into slots with anti-rollback, atomic switch, rollback, and crash safety."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from edge import (
    BundleDigestError, BundleDuplicateError, BundleFormatError, BundleKeyError, BundleManifestError,
    BundleMemberTypeError, BundleMissingFileError, BundleRollbackError, BundleSignatureError, BundleSizeError,
    BundleUnexpectedFileError, BundleVersionError, create_bundle, generate_keypair, verify_bundle,
)
from edge.install import ACTIVE, LOG, PREVIOUS, STEPS, install_bundle, installed, rollback
from edge.manifest import MANIFEST, MANIFEST_MAX_BYTES, SIGNATURE
from edge.model_signature import MODEL_SIGNATURE, ModelSignatureError, verify_folder
from edge.signing import load_private_key, sign
from edge.verify import MEMBER_OVERHEAD_BYTES
from export import OnnxRuntimeEngine
from export.pipeline import ParitySettings, export_onnx_gated
from segmenters.data import dataset_classes
from segmenters.models import build_model
from segmenters.spec import ModelSpec
from segmenters.twin import save_twin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A gated fp32 ONNX engine of a small U-Net (synthetic shapes images), a key pair, and a folder bundle of it."""
    folder = tmp_path_factory.mktemp("shipped")
    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(32, 32), dataset="shapes")
    save_twin(folder / "unet.pt", build_model("unet", spec.num_classes), spec)
    export_onnx_gated(folder / "unet.pt", folder / "unet.onnx", settings=ParitySettings(source="shapes", count=2),
                      progress=False)
    private, public = generate_keypair(folder / "keys")
    return folder, private, public


@pytest.fixture
def folder_bundle(shipped, tmp_path):
    folder, private, _ = shipped
    return create_bundle(tmp_path / "bundle", [folder / "unet.onnx"], private, name="unet-shapes")


# ------------------------------------------------------------------ hostile archives, built member by member
def _signed(manifest: dict | bytes, private) -> tuple[bytes, bytes]:
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=2).encode()
    return data, sign(load_private_key(private), data)


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "", size: int | None = None):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if size is None else size
    return info, (io.BytesIO(data) if info.isreg() else None)


def _archive(path: Path, members, cut_short: bool = False) -> Path:
    """A .tar.gz of `members` (TarInfo, data) in order, written block by block (so a header may lie about its
    size). `cut_short`: instead of ending, the archive goes on with a 1 GiB member and the gzip stream stops
    256 KiB into it, unfinished: a reader that goes further than a refusal should let it fails otherwise."""
    raw = io.BytesIO()
    for info, data in members:
        body = data.getvalue() if data is not None else b""
        raw.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        raw.write(body + b"\0" * (-len(body) % tarfile.BLOCKSIZE))
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: the gzip container
    out = gz.compress(raw.getvalue()) + gz.flush(zlib.Z_SYNC_FLUSH)
    if cut_short:
        following, _ = _member("following.bin", size=1 << 30)
        out += gz.compress(following.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + b"\0" * (256 << 10))
        out += gz.flush(zlib.Z_SYNC_FLUSH)  # 256 KiB of it are there: more than tarfile's read-ahead
    else:
        out += gz.compress(b"\0" * (2 * tarfile.BLOCKSIZE)) + gz.flush()
    path.write_bytes(out)
    return path


def _parts(folder_bundle: Path, private):
    manifest = json.loads((folder_bundle / MANIFEST).read_text())
    engine = (folder_bundle / "unet.onnx").read_bytes()
    return manifest, engine


def _hostile(case: str, folder_bundle: Path, private, out: Path, cut_short: bool | None = None) -> Path:
    """The hostile archive `case`, made from a real bundle; each ends with the bundle's real model.sig (an attacker
    copies it along). `cut_short` (default: for the cases refused on a header or the manifest): see `_archive`."""
    manifest, engine = _parts(folder_bundle, private)
    text, sig = (folder_bundle / MANIFEST).read_bytes(), (folder_bundle / SIGNATURE).read_bytes()
    model_sig = _member(MODEL_SIGNATURE, (folder_bundle / MODEL_SIGNATURE).read_bytes())
    head = [_member(MANIFEST, text), _member(SIGNATURE, sig)]
    flipped = bytearray(engine)
    flipped[len(flipped) // 2] ^= 1
    zeros = b"\0" * (8 << 20)
    garbage = os.urandom(4096)

    def resigned(change) -> list:
        changed = json.loads(json.dumps(manifest))
        data = change(changed)
        body, signature = _signed(data if isinstance(data, bytes) else changed, private)
        return [_member(MANIFEST, body), _member(SIGNATURE, signature), _member("unet.onnx", engine)]

    cases = {
        "unsigned": [_member("unet.onnx", engine)],
        "engine_byte_flipped": head + [_member("unet.onnx", bytes(flipped))],
        "manifest_byte_flipped": [_member(MANIFEST, text.replace(b'"unet-shapes"', b'"unet-shapez"')),
                                  _member(SIGNATURE, sig), _member("unet.onnx", engine)],
        "signature_missing": [_member(MANIFEST, text), _member("unet.onnx", engine)],
        "engine_missing": head,
        "unlisted_file": head + [_member("unet.onnx", engine), _member("extra.onnx", b"not listed")],
        "path_traversal": head + [_member("../escape.onnx", engine)],
        "absolute_path": head + [_member("/tmp/escape.onnx", engine)],
        "symlink_named_like_the_engine": head + [_member("unet.onnx", kind=tarfile.SYMTYPE, link="/etc/passwd")],
        "hard_link_named_like_the_engine": head + [_member("unet.onnx", kind=tarfile.LNKTYPE, link=MANIFEST)],
        "device_named_like_the_engine": head + [_member("unet.onnx", kind=tarfile.CHRTYPE)],
        "fifo_named_like_the_engine": head + [_member("unet.onnx", kind=tarfile.FIFOTYPE)],
        "directory_named_like_the_engine": head + [_member("unet.onnx", kind=tarfile.DIRTYPE)],
        "duplicate_first_altered": head + [_member("unet.onnx", bytes(flipped)), _member("unet.onnx", engine)],
        "duplicate_last_altered": head + [_member("unet.onnx", engine), _member("unet.onnx", bytes(flipped))],
        "duplicate_manifest": head + [_member(MANIFEST, text), _member("unet.onnx", engine)],
        "manifest_not_first": [_member("unet.onnx", engine)] + head,
        "bomb_unlisted": head + [_member("zeros.bin", zeros)],
        "bomb_named_like_the_engine": head + [_member("unet.onnx", zeros)],
        "header_lies_about_size": head + [_member("unet.onnx", engine[:1000], size=len(engine) + (1 << 31))],
        "many_files": head + [_member(f"f{i:05d}", b"") for i in range(2000)],
        "huge_manifest": [_member(MANIFEST, b" " * (MANIFEST_MAX_BYTES + 1)), _member(SIGNATURE, sig)],
        "extra_top_level_field": resigned(lambda m: m.update(run_this="rm -rf /")),
        "extra_file_field": resigned(lambda m: m["files"][0].update(execute=True)),
        "extra_spec_field": resigned(lambda m: m["spec"].update(hidden="x")),
        "duplicate_json_key": resigned(lambda m: json.dumps(m, indent=2).replace(
            '"name": "unet-shapes"', '"name": "unet-shapes", "name": "evil"', 1).encode()),
        "unknown_format": resigned(lambda m: m.update(format=99)),
        "manifest_names_a_path": resigned(lambda m: m["files"][0].update(path="../unet.onnx")),
    }
    if case == "not_gzip":
        out.write_bytes(garbage)
        return out
    if case == "truncated_gzip":  # the stream stops halfway through the engine
        info, _ = _member("unet.onnx", engine)
        half = b"".join(i.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + d.getvalue()
                        + b"\0" * (-len(d.getvalue()) % tarfile.BLOCKSIZE) for i, d in head)
        gz = zlib.compressobj(1, zlib.DEFLATED, 31)
        out.write_bytes(gz.compress(half + info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                                    + engine[: len(engine) // 2]) + gz.flush(zlib.Z_SYNC_FLUSH))
        return out
    return _archive(out, cases[case] + [model_sig], cut_short=case in BOUNDED if cut_short is None else cut_short)


EXPECTED = {
    "unsigned": BundleMissingFileError, "signature_missing": BundleMissingFileError,
    "manifest_not_first": BundleMissingFileError, "engine_missing": BundleMissingFileError,
    "engine_byte_flipped": BundleDigestError, "manifest_byte_flipped": BundleSignatureError,
    "unlisted_file": BundleUnexpectedFileError, "path_traversal": BundleUnexpectedFileError,
    "absolute_path": BundleUnexpectedFileError, "bomb_unlisted": BundleUnexpectedFileError,
    "many_files": BundleUnexpectedFileError,
    "symlink_named_like_the_engine": BundleMemberTypeError, "hard_link_named_like_the_engine": BundleMemberTypeError,
    "device_named_like_the_engine": BundleMemberTypeError, "fifo_named_like_the_engine": BundleMemberTypeError,
    "directory_named_like_the_engine": BundleMemberTypeError,
    "duplicate_first_altered": BundleDigestError,  # the first copy is checked and refused at once
    "duplicate_last_altered": BundleDuplicateError, "duplicate_manifest": BundleDuplicateError,
    "bomb_named_like_the_engine": BundleSizeError, "header_lies_about_size": BundleSizeError,
    "huge_manifest": BundleSizeError,
    "extra_top_level_field": BundleManifestError, "extra_file_field": BundleManifestError,
    "extra_spec_field": BundleManifestError, "duplicate_json_key": BundleManifestError,
    "manifest_names_a_path": BundleManifestError,
    "unknown_format": BundleVersionError,
    "not_gzip": BundleFormatError, "truncated_gzip": BundleFormatError,
}
#: refused on a header or on the manifest: nothing after that point may be read
BOUNDED = {"unsigned", "signature_missing", "manifest_not_first", "unlisted_file", "path_traversal",
           "absolute_path", "bomb_unlisted", "many_files", "symlink_named_like_the_engine",
           "hard_link_named_like_the_engine", "device_named_like_the_engine", "fifo_named_like_the_engine",
           "directory_named_like_the_engine", "duplicate_first_altered", "duplicate_last_altered",
           "duplicate_manifest", "bomb_named_like_the_engine", "header_lies_about_size", "huge_manifest",
           "extra_top_level_field", "extra_file_field", "extra_spec_field", "duplicate_json_key", "unknown_format",
           "manifest_names_a_path", "manifest_byte_flipped", "engine_byte_flipped"}


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_a_hostile_archive_is_refused_with_its_own_error_and_nothing_is_written(case, shipped, folder_bundle,
                                                                                 tmp_path, monkeypatch):
    _, private, public = shipped
    archive = _hostile(case, folder_bundle, private, tmp_path / f"{case}.tar.gz")
    scratch = tmp_path / "scratch"  # every temporary folder verification makes goes here
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    before = _files_under(tmp_path)
    with pytest.raises(EXPECTED[case]) as refused:
        verify_bundle(archive, public)
    assert type(refused.value) is EXPECTED[case], refused.value
    assert _files_under(tmp_path) == before  # nothing left behind, in the scratch space or beside the archive
    assert not (tmp_path.parent / "escape.onnx").exists() and not Path("/tmp/escape.onnx").exists()


def test_every_refusal_class_is_distinct_and_the_good_archive_passes(shipped, folder_bundle, tmp_path):
    """The table covers one class per kind of refusal, and the same builder makes an archive that verifies
    (so each refusal above is caused by its one change)."""
    _, private, public = shipped
    assert set(EXPECTED.values()) == {BundleMissingFileError, BundleDigestError, BundleSignatureError,
                                      BundleUnexpectedFileError, BundleMemberTypeError, BundleDuplicateError,
                                      BundleSizeError, BundleManifestError, BundleVersionError, BundleFormatError}
    _, engine = _parts(folder_bundle, private)
    good = _archive(tmp_path / "good.tar.gz", [_member(name, (folder_bundle / name).read_bytes())
                                               for name in (MANIFEST, SIGNATURE, "unet.onnx", MODEL_SIGNATURE)])
    with verify_bundle(good, public) as ok:
        assert ok.manifest.name == "unet-shapes" and (ok.root / "unet.onnx").read_bytes() == engine
        verify_folder(ok.root, public)  # and the verified copy passes the stock model-signing check


def test_the_archive_patchwatch_writes_starts_with_manifest_and_signature(shipped, tmp_path):
    folder, private, public = shipped
    archive = create_bundle(tmp_path / "b.tar.gz", [folder / "unet.onnx"], private, version=3)
    with tarfile.open(archive) as tar:
        assert tar.getnames() == [MANIFEST, SIGNATURE, "unet.onnx", MODEL_SIGNATURE]
    with verify_bundle(archive, public) as ok:
        assert ok.manifest.version == 3
        assert sorted(p.name for p in ok.root.iterdir()) == sorted([MANIFEST, SIGNATURE, MODEL_SIGNATURE, "unet.onnx"])


def test_a_bomb_is_refused_after_a_bounded_prefix(shipped, folder_bundle, tmp_path):
    """64 MiB of zeros (65 KiB compressed) declared as the engine or as an extra file: refused on its header;
    the archive after it is cut short, which a reader that went on would trip over."""
    _, private, public = shipped
    text, sig = (folder_bundle / MANIFEST).read_bytes(), (folder_bundle / SIGNATURE).read_bytes()
    for name, error in (("unet.onnx", BundleSizeError), ("zeros.bin", BundleUnexpectedFileError)):
        archive = _archive(tmp_path / f"{name}.tar.gz", [_member(MANIFEST, text), _member(SIGNATURE, sig),
                                                         _member(name, b"\0" * (64 << 20))], cut_short=True)
        assert archive.stat().st_size < (1 << 20) and MEMBER_OVERHEAD_BYTES < (1 << 20)
        with pytest.raises(error):
            verify_bundle(archive, public)


# ---------------------------------------------------------------------------------------------- folder bundles
def test_a_folder_bundle_with_a_symlinked_engine_is_refused_even_with_the_right_content(shipped, folder_bundle,
                                                                                        tmp_path):
    _, _, public = shipped
    outside = tmp_path / "outside.onnx"
    os.replace(folder_bundle / "unet.onnx", outside)
    (folder_bundle / "unet.onnx").symlink_to(outside)
    with pytest.raises(BundleMemberTypeError, match="symbolic link"):
        verify_bundle(folder_bundle, public)
    (folder_bundle / "unet.onnx").unlink()
    os.mkfifo(folder_bundle / "unet.onnx")
    with pytest.raises(BundleMemberTypeError, match="not a regular file"):
        verify_bundle(folder_bundle, public)


def test_a_folder_bundle_with_a_symlinked_manifest_is_refused(shipped, folder_bundle, tmp_path):
    _, _, public = shipped
    os.replace(folder_bundle / MANIFEST, tmp_path / "m.json")
    (folder_bundle / MANIFEST).symlink_to(tmp_path / "m.json")
    with pytest.raises(BundleMemberTypeError):
        verify_bundle(folder_bundle, public)


def test_what_is_loaded_is_what_was_hashed(shipped, folder_bundle):
    """The verified bundle is a private copy: swapping the engine in the source folder afterwards changes nothing."""
    _, _, public = shipped
    original = (folder_bundle / "unet.onnx").read_bytes()
    with verify_bundle(folder_bundle, public) as ok:
        (folder_bundle / "unet.onnx").write_bytes(b"swapped after the check")
        assert ok.root != folder_bundle and (ok.root / "unet.onnx").read_bytes() == original
        assert oct((ok.root).stat().st_mode & 0o777) == "0o700"
        OnnxRuntimeEngine(ok.root / "unet.onnx")  # it loads
    assert not ok.root.exists()


def test_a_wrong_key_is_named_and_a_resigned_manifest_with_extra_fields_is_refused(shipped, folder_bundle, tmp_path):
    _, private, public = shipped
    _, other = generate_keypair(tmp_path / "other")
    with pytest.raises(BundleKeyError, match="signed by key p256:"):
        verify_bundle(folder_bundle, other)
    manifest = json.loads((folder_bundle / MANIFEST).read_text())
    manifest["spec"]["normalization"]["gamma"] = 2.2
    text, sig = _signed(manifest, private)
    (folder_bundle / MANIFEST).write_bytes(text)
    (folder_bundle / SIGNATURE).write_bytes(sig)
    with pytest.raises(BundleManifestError, match="spec.normalization.gamma"):
        verify_bundle(folder_bundle, public)


# ----------------------------------------------------------------------------------------- install and rollback
def _bundle_v(shipped, tmp_path, version: int) -> Path:
    folder, private, _ = shipped
    return create_bundle(tmp_path / f"v{version}.tar.gz", [folder / "unet.onnx"], private, name="unet-shapes",
                         version=version)


def _runs(active: Path, public) -> bool:
    with verify_bundle(active, public) as ok:
        labels = OnnxRuntimeEngine(ok.root / "unet.onnx").segment(np.zeros((32, 32, 3), np.uint8))[0]
    return labels.shape == (32, 32)


def test_install_switches_keeps_the_previous_refuses_older_and_rolls_back(shipped, tmp_path):
    _, _, public = shipped
    root = tmp_path / "vehicle"
    first = install_bundle(_bundle_v(shipped, tmp_path, 1), public, root)
    second = install_bundle(_bundle_v(shipped, tmp_path, 2), public, root)
    home = root / "unet-shapes"
    assert installed(root, "unet-shapes").version == 2 and second["previous"] == first["slot"]
    assert os.readlink(home / ACTIVE) == f"slots/{second['slot']}" and os.readlink(home / PREVIOUS).endswith(first["slot"])
    assert _runs(home / ACTIVE, public)
    for version in (1, 2):  # a replayed older (or the same) signed bundle
        with pytest.raises(BundleRollbackError, match=f"version {version} is not newer than the installed version 2"):
            install_bundle(_bundle_v(shipped, tmp_path, version) if version == 2 else tmp_path / "v1.tar.gz", public,
                           root)
    assert installed(root, "unet-shapes").version == 2 and not list(root.glob(".incoming-*"))
    back = rollback(root, "unet-shapes")
    assert back["slot"] == first["slot"] and installed(root, "unet-shapes").version == 1
    # rolled back to 1: version 2's slot is kept, so a replay of 2 is still not "newer"
    with pytest.raises(BundleRollbackError):
        install_bundle(tmp_path / "v2.tar.gz", public, root)
    down = install_bundle(tmp_path / "v1.tar.gz", public, root, allow_downgrade="field fix FB-12: v2 misreads rain")
    assert down["downgrade_reason"].startswith("field fix")
    events = [json.loads(line) for line in (home / LOG).read_text().splitlines()]
    assert [e["event"] for e in events] == ["installed", "installed", "refused", "refused", "rolled_back", "refused",
                                            "installed"]
    assert events[-1]["downgrade_reason"] == "field fix FB-12: v2 misreads rain"
    with pytest.raises(ValueError, match="reason"):
        install_bundle(tmp_path / "v1.tar.gz", public, root, allow_downgrade=" ")


def test_a_hostile_bundle_does_not_touch_the_install(shipped, folder_bundle, tmp_path):
    _, private, public = shipped
    root = tmp_path / "vehicle"
    install_bundle(_bundle_v(shipped, tmp_path, 1), public, root)
    before = _files_under(root)
    with pytest.raises(BundleDuplicateError):
        install_bundle(_hostile("duplicate_last_altered", folder_bundle, private, tmp_path / "h.tar.gz"), public, root)
    assert _files_under(root) == before


CRASHING_INSTALL = textwrap.dedent("""
    import os, signal, sys
    from edge.install import install_bundle
    bundle, key, root, crash_at = sys.argv[1:]
    def on_step(step):
        if step == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
    install_bundle(bundle, key, root, on_step=on_step)
""")


@pytest.mark.parametrize("step", STEPS[:-1])
def test_an_installer_killed_at_any_step_leaves_the_previous_bundle_active_and_runnable(step, shipped, tmp_path):
    _, _, public = shipped
    root = tmp_path / "vehicle"
    first = install_bundle(_bundle_v(shipped, tmp_path, 1), public, root)
    killed = subprocess.run([sys.executable, "-c", CRASHING_INSTALL, str(_bundle_v(shipped, tmp_path, 2)),
                             str(public), str(root), step], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    home = root / "unet-shapes"
    assert os.readlink(home / ACTIVE) == f"slots/{first['slot']}" and installed(root, "unet-shapes").version == 1
    assert _runs(home / ACTIVE, public)
    # the next install cleans up what the killed one left and goes through
    again = install_bundle(tmp_path / "v2.tar.gz", public, root) if step in STEPS[:3] else None
    if again is None:  # staged before the kill: its slot now counts as installed, so 2 is not newer; 3 is
        again = install_bundle(_bundle_v(shipped, tmp_path, 3), public, root)
    assert installed(root, again["name"]).version == again["version"] and not list(root.glob(".incoming-*"))
    assert not list(home.glob(".active.*")) and not list(home.glob(".previous.*"))


def test_cli_install_refuses_a_downgrade_and_rolls_back(shipped, tmp_path):
    _, _, public = shipped
    root = tmp_path / "vehicle"
    cli = [sys.executable, "-m", "patchwatch.cli", "edge"]
    for version in (1, 2):
        done = subprocess.run(cli + ["install", str(_bundle_v(shipped, tmp_path, version)), "--key", str(public),
                                     "--root", str(root)], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    refused = subprocess.run(cli + ["install", str(tmp_path / "v1.tar.gz"), "--key", str(public), "--root", str(root)],
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 1 and "REFUSED (BundleRollbackError)" in refused.stderr
    back = subprocess.run(cli + ["rollback", "unet-shapes", "--root", str(root)], capture_output=True, text=True,
                          cwd=ROOT)
    assert back.returncode == 0 and json.loads(back.stdout)["event"] == "rolled_back"
    assert installed(root, "unet-shapes").version == 1
    both = subprocess.run(cli + ["verify", str(root / "unet-shapes" / "active"), "--key", str(public),
                                 "--model-signing"], capture_output=True, text=True, cwd=ROOT)
    assert both.returncode == 0 and json.loads(both.stdout)["model_signing"] == "verified", both.stderr


# ------------------------------------------------------------------------------ the stock model-signing verifier
def _stock_cli(folder: Path, public) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).parent / "model_signing"
    return subprocess.run([str(tool), "verify", "key", str(folder), "--signature", str(folder / MODEL_SIGNATURE),
                           "--public_key", str(public)], capture_output=True, text=True, timeout=300)


def test_a_bundle_verifies_with_the_stock_model_signing_cli_and_a_flipped_byte_fails_it(shipped, tmp_path):
    folder, private, public = shipped
    folder_bundle = tmp_path / "by-cli"
    made = subprocess.run([sys.executable, "-m", "patchwatch.cli", "edge", "bundle", str(folder / "unet.onnx"),
                           "--key", str(private), "--out", str(folder_bundle)], capture_output=True, text=True,
                          cwd=ROOT)
    assert made.returncode == 0, made.stderr
    ok = _stock_cli(folder_bundle, public)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for name in ("unet.onnx", MANIFEST):
        data = bytearray((folder_bundle / name).read_bytes())
        data[len(data) // 3] ^= 1
        (folder_bundle / name).write_bytes(bytes(data))
        failed = _stock_cli(folder_bundle, public)
        assert failed.returncode != 0 and "verification failed" in (failed.stdout + failed.stderr).lower(), failed
        data[len(data) // 3] ^= 1
        (folder_bundle / name).write_bytes(bytes(data))
    assert _stock_cli(folder_bundle, public).returncode == 0


def _stock_verdict(archive: Path, public, scratch: Path) -> str:
    """What a vehicle team with only stock tools sees: unpack (tarfile's "data" filter), then model_signing."""
    folder = scratch / archive.stem
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        verify_folder(folder, public)
    except (tarfile.TarError, OSError, EOFError, ModelSignatureError) as exc:
        return type(exc).__name__
    return "accepted"


#: the hostile archives that unpack into exactly the signed folder: the stock verifier accepts them (and what it
#: accepts is the genuine model); patchwatch refuses them for how the archive is built, before unpacking
STOCK_ACCEPTS = {"duplicate_first_altered", "duplicate_manifest", "manifest_not_first"}
#: signed by the key holder with a manifest the format forbids: integrity holds, so only the strict parser refuses
SIGNED_POLICY_CASES = {"extra_top_level_field", "extra_file_field", "extra_spec_field", "duplicate_json_key",
                       "unknown_format", "manifest_names_a_path"}


def test_the_stock_verifier_agrees_wherever_a_byte_was_tampered(shipped, folder_bundle, tmp_path):
    """Every hostile archive, unpacked whole as a stock user would: the stock verifier refuses every one whose
    unpacked files differ from the signed ones; patchwatch (above) refuses all of them."""
    _, private, public = shipped
    verdicts = {}
    for case in sorted(set(EXPECTED) - {"not_gzip", "truncated_gzip"}):
        archive = _hostile(case, folder_bundle, private, tmp_path / f"{case}.tar.gz", cut_short=False)
        verdicts[case] = _stock_verdict(archive, public, tmp_path / "unpacked")
    accepted = {case for case, verdict in verdicts.items() if verdict == "accepted"}
    assert accepted == STOCK_ACCEPTS, verdicts
    assert not accepted & SIGNED_POLICY_CASES  # model.sig was not re-made: the changed manifest fails it


# ------------------------------------------------------------------------------------------------ vehicle targets
def test_a_plan_is_checked_against_a_named_vehicle_from_the_bundle_alone(shipped, tmp_path):
    """A plan built on a Jetson Orin (JetPack 6) fits that vehicle; the same TensorRT and GPU on x86_64 does not, nor
    does JetPack 5; the ONNX engine beside it is portable, so the bundle verifies with the plan refused only by name."""
    import shutil

    from edge.targets import VEHICLE_TARGETS
    from export.pipeline import report_paths
    from export.tensorrt_engine import PlanInfo, PlanTarget, sidecar_path

    folder, private, public = shipped
    orin = VEHICLE_TARGETS["jetson-orin-jetpack6"]
    spec = json.loads((create_bundle(tmp_path / "probe", [folder / "unet.onnx"], private) / MANIFEST).read_text())["spec"]

    def plan(target: PlanTarget, name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(b"serialised TensorRT engine for " + target.model_dump_json().encode())
        info = PlanInfo(target=target, precision="fp16", profile={"min": (1, 3, 32, 32), "opt": (1, 3, 32, 32),
                        "max": (4, 3, 32, 32)}, workspace_bytes=1 << 30, onnx_digest="sha256:0",
                        spec=ModelSpec.model_validate(spec), built_at=0.0)
        sidecar_path(path).write_text(info.model_dump_json())
        shutil.copyfile(report_paths(folder / "unet.onnx")[0], report_paths(path)[0])
        return path

    on_orin = create_bundle(tmp_path / "orin", [folder / "unet.onnx", plan(orin, "unet.orin.plan")], private)
    on_x86 = create_bundle(tmp_path / "x86", [folder / "unet.onnx", plan(orin.model_copy(update={"cpu_arch": "x86_64"}),
                                                                          "unet.x86.plan")], private)
    cli = [sys.executable, "-m", "patchwatch.cli", "edge", "verify", "--key", str(public)]
    ok = subprocess.run(cli + [str(on_orin), "--target", "jetson-orin-jetpack6"], capture_output=True, text=True,
                        cwd=ROOT)
    assert ok.returncode == 0 and json.loads(ok.stdout)["target"]["cpu_arch"] == "aarch64", ok.stderr
    for bundle, target, why in ((on_x86, "jetson-orin-jetpack6", "built on x86_64, the target is aarch64"),
                                (on_orin, "jetson-orin-jetpack5", "TensorRT 10.3.0, this machine has TensorRT 8.5.2")):
        refused = subprocess.run(cli + [str(bundle), "--target", target], capture_output=True, text=True, cwd=ROOT)
        assert refused.returncode == 1 and "REFUSED (BundleTargetError)" in refused.stderr and why in refused.stderr
    unknown = subprocess.run(cli + [str(on_orin), "--target", "jetson-nano"], capture_output=True, text=True, cwd=ROOT)
    assert unknown.returncode == 2 and "known: jetson-orin-jetpack5" in unknown.stderr


def test_a_passphrase_protected_key_signs_both_signatures(shipped, tmp_path, monkeypatch):
    from edge.signing import PASSPHRASE_ENV, KeyFileError

    folder, _, _ = shipped
    private, public = generate_keypair(tmp_path / "keys", passphrase=b"correct horse")
    with pytest.raises(KeyFileError, match=PASSPHRASE_ENV):
        create_bundle(tmp_path / "refused", [folder / "unet.onnx"], private)
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    bundle = create_bundle(tmp_path / "b", [folder / "unet.onnx"], private)
    with verify_bundle(bundle, public) as ok:
        verify_folder(ok.root, public)
    assert b"ENCRYPTED" in private.read_bytes()
