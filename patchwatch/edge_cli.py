"""`patchwatch edge keygen|bundle|verify|install|rollback|run`: signed bundles for vehicles, checked before anything runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from patchwatch.options import parse_size


@click.group()
def edge() -> None:
    """Signed engine bundles: make, verify and run them (no Ray needed)."""


@edge.command("keygen")
@click.option("--out", "out_dir", default=lambda: str(Path(click.get_app_dir("patchwatch")) / "keys"),
              show_default="~/.config/patchwatch/keys", help="folder for <name>.key and <name>.pub")
@click.option("--name", default="signing", show_default=True)
@click.option("--passphrase-env", help="encrypt the private key with the passphrase in this environment variable")
@click.option("--inside-repo", is_flag=True, help="write the key even into a git work tree (where it can be committed)")
def keygen(out_dir, name, passphrase_env, inside_repo) -> None:
    """Generate an ECDSA P-256 signing key pair (private key file mode 0600). A folder inside a git work tree is
    refused unless --inside-repo is given."""
    from edge.signing import generate_keypair, git_work_tree

    repository = None if inside_repo else git_work_tree(out_dir)
    if repository:
        raise click.ClickException(
            f"refusing to write a private key into {Path(out_dir).absolute()}: it is inside the git work tree "
            f"{repository}, where it can be committed; give --out a folder outside it (the default is "
            "~/.config/patchwatch/keys) or pass --inside-repo")
    passphrase = None
    if passphrase_env:
        if not os.environ.get(passphrase_env):
            raise click.ClickException(f"environment variable {passphrase_env} is empty or unset")
        passphrase = os.environ[passphrase_env].encode()
    try:
        private, public = generate_keypair(out_dir, name, passphrase)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"private_key": str(private), "public_key": str(public)}, indent=2))


@edge.command("bundle")
@click.argument("engines", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "private_key", required=True, type=click.Path(dir_okay=False), help="ECDSA P-256 private key")
@click.option("--out", required=True, help="bundle folder, or an archive path ending in .tar.gz")
@click.option("--name", help="bundle name (default <arch>-<dataset>)")
@click.option("--version", "model_version", type=click.IntRange(min=1), default=1, show_default=True,
              help="this model's release number: a vehicle refuses a bundle not newer than the one it runs")
def bundle(engines, private_key, out, name, model_version) -> None:
    """Pack gated ENGINES (.onnx, .plan) with a signed manifest."""
    from edge.bundle import create_bundle
    from edge.manifest import BundleError
    from edge.signing import KeyFileError

    try:
        path = create_bundle(out, list(engines), private_key, name=name, version=model_version)
    except (BundleError, KeyFileError, FileExistsError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"bundle written: {path}")


def _target(vehicle, tensorrt_version, compute_capability, cpu_arch):
    from edge.targets import vehicle_target
    from edge.verify import CURRENT_MACHINE
    from export.tensorrt_engine import PlanTarget

    if vehicle and (tensorrt_version or compute_capability or cpu_arch):
        raise click.UsageError("give --target, or --tensorrt-version/--compute-capability/--cpu-arch, not both")
    if vehicle:
        try:
            return vehicle_target(vehicle)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    if bool(tensorrt_version) != bool(compute_capability):
        raise click.UsageError("give both --tensorrt-version and --compute-capability, or neither")
    if tensorrt_version:
        return PlanTarget(tensorrt_version=tensorrt_version, compute_capability=compute_capability, cpu_arch=cpu_arch)
    return CURRENT_MACHINE


@edge.command("verify")
@click.argument("bundle_path", type=click.Path(exists=True))
@click.option("--key", "public_key", required=True, type=click.Path(dir_okay=False), help="ECDSA P-256 public key")
@click.option("--tensorrt-version", help="check plans against this TensorRT release instead of this machine's")
@click.option("--compute-capability", help="... and this GPU compute capability, e.g. 8.7 (Orin)")
@click.option("--cpu-arch", help="... and this CPU architecture, e.g. aarch64")
@click.option("--target", "vehicle", help="a known vehicle instead: jetson-orin-jetpack6, jetson-orin-jetpack5, "
                                          "jetson-xavier-jetpack5")
@click.option("--model-signing", "stock", is_flag=True,
              help="also check model.sig with the stock OpenSSF model-signing verifier, on what was verified")
def verify(bundle_path, public_key, tensorrt_version, compute_capability, cpu_arch, vehicle, stock) -> None:
    """Check signature, signer, every file's digest and the plans' TensorRT/GPU target; exit 1 on any failure."""
    from edge.manifest import BundleError
    from edge.model_signature import ModelSignatureError, verify_folder
    from edge.signing import KeyFileError
    from edge.verify import verify_bundle

    target = _target(vehicle, tensorrt_version, compute_capability, cpu_arch)
    try:
        with verify_bundle(bundle_path, public_key, target=target) as ok:
            if stock:
                verify_folder(ok.root, public_key)
            click.echo(json.dumps({
                "verified": True,
                "name": ok.manifest.name,
                "version": ok.manifest.version,
                "signer": ok.manifest.signer,
                "created_at": ok.manifest.created_at,
                "engines": [{"file": e.path, "runtime": e.role, "precision": e.precision, "parity": e.parity}
                            for e in ok.manifest.engines()],
                "unchecked_plans": ok.unchecked_plans,
                **({"target": target.model_dump(exclude_none=True)} if hasattr(target, "model_dump") else {}),
                **({"model_signing": "verified"} if stock else {}),
            }, indent=2))
    except (BundleError, KeyFileError, ModelSignatureError) as exc:
        click.echo(f"REFUSED ({type(exc).__name__}): {exc}", err=True)
        sys.exit(1)


@edge.command("install")
@click.argument("bundle_path", type=click.Path(exists=True))
@click.option("--key", "public_key", required=True, type=click.Path(dir_okay=False), help="ECDSA P-256 public key")
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="install root: <root>/<name>/active is what runs")
@click.option("--allow-downgrade", metavar="REASON",
              help="install a version not newer than an installed one; the reason is logged")
def install(bundle_path, public_key, root, allow_downgrade) -> None:
    """Verify BUNDLE_PATH into a new slot, smoke-test its engine, then make it active atomically (the previous
    slot is kept for `edge rollback`). A version not newer than an installed one is refused."""
    from edge.install import install_bundle
    from edge.manifest import BundleError
    from edge.signing import KeyFileError

    try:
        record = install_bundle(bundle_path, public_key, root, allow_downgrade=allow_downgrade)
    except (BundleError, KeyFileError) as exc:
        click.echo(f"REFUSED ({type(exc).__name__}): {exc}", err=True)
        sys.exit(1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(json.dumps(record | {"active": str(Path(root) / record["name"] / "active")}, indent=2))


@edge.command("rollback")
@click.argument("name")
@click.option("--root", required=True, type=click.Path(file_okay=False, exists=True), help="install root")
def rollback(name, root) -> None:
    """Make NAME's previous slot active again (the one it leaves becomes the previous)."""
    from edge.install import rollback as switch_back
    from edge.manifest import BundleError

    try:
        click.echo(json.dumps(switch_back(root, name), indent=2))
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc


@edge.command("run")
@click.argument("bundle_path", type=click.Path(exists=True))
@click.option("--key", "public_key", required=True, type=click.Path(dir_okay=False), help="ECDSA P-256 public key")
@click.option("--source", required=True, help="image, folder, glob, video file, camera index or stream URL")
@click.option("--out", "out_dir", required=True, help="folder for labels/, overlays/, overlay.mp4, summary.json")
@click.option("--runtime", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="default: the most exact engine")
@click.option("--write", "outputs", type=click.Choice(["labels", "overlay"]), multiple=True,
              help="what to write per frame (repeatable; default both)")
@click.option("--size", help="HEIGHTxWIDTH frames are segmented at (default: the spec's input size, as eval); "
                             "labels are written at each frame's own size")
@click.option("--limit", type=click.IntRange(min=1), help="stop after this many frames read")
@click.option("--reconnect-attempts", type=click.IntRange(min=1),
              help="a camera or stream: opens in a row before giving up (default: reconnect for ever)")
@click.option("--quiet", is_flag=True)
def run(bundle_path, public_key, source, out_dir, runtime, precision, outputs, size, limit, reconnect_attempts,
        quiet) -> None:
    """Verify BUNDLE_PATH, then segment frames from SOURCE with it (ONNX Runtime or TensorRT, no Ray). Files and
    folders lose no frame; a camera or stream is read live (the newest frame; those the engine had no time for
    are counted as dropped) and reconnected when it drops."""
    from edge.manifest import BundleError
    from edge.runner import run_bundle
    from edge.signing import KeyFileError
    from export import EngineError
    from monitor.streams import Backoff

    try:
        summary = run_bundle(bundle_path, public_key, source, out_dir, runtime=runtime, precision=precision,
                             outputs=tuple(outputs) or ("labels", "overlay"), size=parse_size(size), limit=limit,
                             progress=not quiet,
                             backoff=Backoff(attempts=reconnect_attempts) if reconnect_attempts else None)
    except (BundleError, KeyFileError) as exc:
        click.echo(f"REFUSED ({type(exc).__name__}): {exc}", err=True)
        sys.exit(1)
    except (EngineError, OSError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({k: summary[k] for k in ("frames", "dropped", "fps", "inference_ms_per_frame", "engine")}
                          | {"errors": len(summary["errors"]), "summary": str(Path(out_dir) / "summary.json")},
                          indent=2))
