"""Hostile bundles against `edge verify`: time and bytes written before the refusal, beside the old way (unpack the
archive, then check), measured in the same run.

    python bench/edge_hostile.py [--out bench/results/edge_hostile] [--bomb-gib 2] [--files 100000]

Archives (signed with a fresh key where a signature is part of the attack):
- bomb-unlisted:  manifest + signature of a real bundle, then BOMB GiB of zeros as an extra member;
- bomb-as-engine: the same zeros named like the bundle's engine;
- many-files:     manifest + signature, then FILES empty members;
- unsigned:       BOMB GiB of zeros and nothing else.
Bytes written are the process's own (`/proc/self/io` write_bytes), so they count every file any step made.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge import BundleError, create_bundle, generate_keypair, verify_bundle  # noqa: E402
from edge.manifest import MANIFEST, SIGNATURE  # noqa: E402
from export.pipeline import ParitySettings, export_onnx_gated  # noqa: E402
from segmenters.data import dataset_classes  # noqa: E402
from segmenters.models import build_model  # noqa: E402
from segmenters.spec import ModelSpec  # noqa: E402
from segmenters.twin import save_twin  # noqa: E402


class Zeros(io.RawIOBase):
    """`size` zero bytes, read in pieces (never held whole)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def real_bundle(work: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(32, 32), dataset="shapes")
    save_twin(work / "unet.pt", build_model("unet", spec.num_classes), spec)
    export_onnx_gated(work / "unet.pt", work / "unet.onnx", settings=ParitySettings(source="shapes", count=2),
                      progress=False)
    private, public = generate_keypair(work / "keys")
    return create_bundle(work / "bundle", [work / "unet.onnx"], private, name="unet-shapes"), public


def hostile(path: Path, bundle: Path | None, members: list[tuple[str, int]]) -> Path:
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for name in ((MANIFEST, SIGNATURE) if bundle else ()):
            tar.add(bundle / name, arcname=name)
        for name, size in members:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BufferedReader(Zeros(size), buffer_size=1 << 20) if size else None)
    return path


def measure(check) -> dict:
    start_bytes, start = written_bytes(), time.perf_counter()
    outcome = "accepted"
    try:
        check()
    except (BundleError, tarfile.TarError, OSError) as exc:
        outcome = type(exc).__name__
    return {"seconds": round(time.perf_counter() - start, 3), "mib_written": round((written_bytes() - start_bytes) / 2**20, 3),
            "outcome": outcome}


def unpack_then_check(archive: Path, scratch: Path) -> None:
    """The old way, the baseline: the whole archive unpacked (tarfile's "data" filter), then looked at."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(folder, filter="data")
        if not (folder / MANIFEST).is_file() or not (folder / SIGNATURE).is_file():
            raise OSError("no manifest")
        raise OSError("refused after unpacking")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/edge_hostile")
    parser.add_argument("--bomb-gib", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edge-hostile-"))
    try:
        bundle, public = real_bundle(work)
        engine = json.loads((bundle / MANIFEST).read_text())["files"][0]["path"]
        bomb = int(args.bomb_gib * 2**30)
        cases = {
            "bomb-unlisted": hostile(work / "bomb-unlisted.tar.gz", bundle, [("zeros.bin", bomb)]),
            "bomb-as-engine": hostile(work / "bomb-as-engine.tar.gz", bundle, [(engine, bomb)]),
            "many-files": hostile(work / "many-files.tar.gz", bundle, [(f"f{i:06d}", 0) for i in range(args.files)]),
            "unsigned": hostile(work / "unsigned.tar.gz", None, [("zeros.bin", bomb)]),
        }
        rows = {}
        for name, archive in cases.items():
            scratch = Path(tempfile.mkdtemp(dir=work))
            tempfile.tempdir = str(scratch)
            now = measure(lambda: verify_bundle(archive, public).close())
            before = measure(lambda: unpack_then_check(archive, scratch))
            tempfile.tempdir = None
            rows[name] = {"archive_mib": round(archive.stat().st_size / 2**20, 2), "verify": now, "unpack_first": before,
                          "time_ratio": round(before["seconds"] / max(now["seconds"], 1e-6), 1)}
            print(f"{name:15s} {rows[name]['archive_mib']:8.2f} MiB archive | verify: {now['outcome']} in "
                  f"{now['seconds']:.3f} s, {now['mib_written']:.3f} MiB written | unpack first: {before['seconds']:.2f} s, "
                  f"{before['mib_written']:.0f} MiB written | {rows[name]['time_ratio']}x faster", flush=True)
        (out / "edge_hostile.json").write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
