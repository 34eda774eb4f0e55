"""`audit` command line, also reachable as `patchwatch audit`, so that
`ray job submit -- audit campaign cfg.yaml` reads like what it does."""

from __future__ import annotations

import json

import click

from segmenters.device import DEVICE_HELP, DeviceError

#: shared by the commands whose trials run as Ray tasks
GPU_WAIT = click.option("--gpu-wait", type=click.FloatRange(min=0),
                        help="seconds a job on a joined cluster waits for a node with the GPUs one trial needs "
                             "(autoscaling) before it refuses (default: audit.runner.GPU_WAIT_S); a local "
                             "cluster is refused at once")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def audit() -> None:
    """Attack campaigns, VGatt attribution audits and complexity bounds."""


@audit.command()
@click.argument("campaign_file", type=click.Path(dir_okay=False))
@click.option("--out", help="run folder (default runs/campaigns/<campaign name>)")
@click.option("--address", help="Ray cluster address (default: $RAY_ADDRESS, as inside `ray job submit`, "
                                "else a local cluster)")
@click.option("--cpus-per-trial", type=float, default=1.0, show_default=True)
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs Ray gives each trial; a fraction shares one GPU among several trials")
@click.option("--device", help=f"where trials run: {DEVICE_HELP} (default: the campaign file's `device`)")
@GPU_WAIT
@click.option("--local-cpus", type=int, help="CPUs of the local cluster when one is started")
@click.option("--quiet", is_flag=True, help="no progress bar")
def campaign(campaign_file, out, address, cpus_per_trial, gpus_per_trial, device, gpu_wait, local_cpus,
             quiet) -> None:
    """Run a patch-attack campaign; every finished trial is stored at once, and a rerun skips stored trials."""
    from audit.campaign import CampaignError, load_campaign
    from audit.runner import run_campaign

    try:
        config = load_campaign(campaign_file)
        summary = run_campaign(campaign_file, out or f"runs/campaigns/{config.name}", address=address,
                               num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, local_cpus=local_cpus,
                               progress=not quiet, device=device, gpu_wait_s=gpu_wait)
    except (CampaignError, DeviceError) as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(summary)


def _finish(summary: dict) -> None:
    """Print a Ray-task run's summary; a run with failed items exits 1 (a job that lost work must look failed)."""
    click.echo(json.dumps(summary, indent=2))
    if summary["failed"]:
        raise SystemExit(1)


@audit.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir) -> None:
    """Write RUN_DIR/report/index.html (tables, plots vs patch size, engine replay, every trial's pictures) and
    RUN_DIR/report/summary.json (strict JSON: null where a figure could not be measured)."""
    from audit.report import write_report

    try:
        path = write_report(run_dir)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


@audit.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
@click.option("--cpus-per-trial", type=float, default=1.0, show_default=True)
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs Ray gives each audited trial; a fraction shares one GPU")
@click.option("--device", default="auto", show_default=True, help=f"where VGatt runs: {DEVICE_HELP}")
@GPU_WAIT
@click.option("--local-cpus", type=int, help="CPUs of the local cluster when one is started")
@click.option("--quiet", is_flag=True, help="no progress bar")
def vgatt(run_dir, address, cpus_per_trial, gpus_per_trial, device, gpu_wait, local_cpus, quiet) -> None:
    """VGatt over a campaign run's stored trials: how much of each flip the patch carries (resumable). Then
    refreshes RUN_DIR/report (as `audit report` does), so the report shows the audit at once."""
    from audit.patch_audit import run_patch_audit
    from audit.report import write_report

    try:
        summary = run_patch_audit(run_dir, address=address, num_cpus=cpus_per_trial, num_gpus=gpus_per_trial,
                                  device=device, local_cpus=local_cpus, progress=not quiet, gpu_wait_s=gpu_wait)
    except (FileNotFoundError, DeviceError) as exc:
        raise click.ClickException(str(exc)) from exc
    # also after failed audits: the report shows what was audited and lists the failures
    summary["report"] = str(write_report(run_dir))
    _finish(summary)


@audit.command()
@click.option("--arch", "archs", multiple=True,
              help="zoo architectures (default: all); with --mode seed, Table 1's: unet_ronneberger, fcn8s_vgg16, "
                   "deeplabv3_resnet18, lraspp_mobilenetv3")
@click.option("--patch", "patches", type=int, multiple=True, help="patch sides (default 2 5 10 20)")
@click.option("--classes", type=int, default=19, show_default=True, help="classes per pixel (19: Cityscapes)")
@click.option("--size", default="256x256", show_default=True, help="HEIGHTxWIDTH of the image the patch sits in")
@click.option("--twin", type=click.Path(exists=True, dir_okay=False),
              help="also count linear regions met along random lines through the patch subspace of this twin")
@click.option("--lines", type=int, default=4, show_default=True)
@click.option("--samples", type=int, default=4096, show_default=True, help="points per line (finer finds more regions)")
@click.option("--out", type=click.Path(file_okay=False), help="write bounds.json and bounds.md here")
@click.option("--device", default="auto", show_default=True,
              help=f"where the twin runs for --twin's regions: {DEVICE_HELP}")
@click.option("--mode", type=click.Choice(["refined", "seed"]), default="refined", show_default=True,
              help="refined: the project's bound for zoo architectures; seed: seed 000's Table 1 computed the seed's "
                   "way for its four networks, beside its published cells and the refined bound")
@click.option("--skip-refined", is_flag=True, help="--mode seed without the refined bound beside it (seconds)")
def bounds(archs, patches, classes, size, twin, lines, samples, out, device, mode, skip_refined) -> None:
    """Seed 000's complexity bound: how large a region a patch could force arbitrary maps on, per architecture."""
    from pathlib import Path

    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError as exc:
        raise click.BadParameter(f"expected HEIGHTxWIDTH such as 256x256, got {size!r}") from exc
    if mode == "seed":
        if twin:
            raise click.UsageError("--twin goes with --mode refined")
        table, result = _seed_bounds(archs, patches, classes, (height, width), refined=not skip_refined)
    else:
        table, result = _refined_bounds(archs, patches, classes, (height, width), twin, lines, samples, device)
    click.echo(table)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bounds.json").write_text(json.dumps(result, indent=2))
        (folder / "bounds.md").write_text(table)


def _refined_bounds(archs, patches, classes, size, twin, lines, samples, device) -> tuple[str, dict]:
    from audit.bounds import bounds_markdown, bounds_table, empirical_regions
    from segmenters.device import resolve_device
    from segmenters.models import MODELS

    try:
        device = resolve_device(device)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from exc
    unknown = sorted(set(archs) - set(MODELS))
    if unknown:
        raise click.ClickException(f"unknown architecture(s) {unknown}; the zoo has {sorted(MODELS)}")
    rows = bounds_table(list(archs) or sorted(MODELS), list(patches) or [2, 5, 10, 20], classes, size)
    table = bounds_markdown(rows)
    result = {"mode": "refined", "bounds": rows}
    if twin:
        table += _architecture_note(twin)
        result["empirical"] = empirical_regions(twin, list(patches) or [2, 5, 10, 20], lines=lines, samples=samples,
                                                device=device)
        table += "\nLinear regions met along random lines through the patch subspace (" + twin + "):\n\n"
        table += "\n".join(f"- {r['patch']}x{r['patch']}: {r['regions']} (per line)" for r in result["empirical"])
        table += "\n"
    return table, result


def _seed_bounds(archs, patches, classes, size, refined: bool) -> tuple[str, dict]:
    """Seed 000's Table 1: its columns chosen by architecture (default all four)."""
    from audit.seed_table import SEED_ASSUMPTIONS, SEED_COLUMNS, SEED_PATCHES, seed_markdown, seed_table

    by_arch = {arch: column for column, (arch, _) in SEED_COLUMNS.items()}
    unknown = sorted(set(archs) - set(by_arch))
    if unknown:
        raise click.ClickException(f"unknown Table 1 architecture(s) {unknown}; --mode seed has {sorted(by_arch)}")
    rows = seed_table(list(patches) or SEED_PATCHES, classes, size, refined=refined,
                      columns=[by_arch[a] for a in archs] or None)
    assumptions = [dict(zip(("what", "seed", "refined"), a)) for a in SEED_ASSUMPTIONS]
    return seed_markdown(rows), {"mode": "seed", "table_1": rows, "assumptions": assumptions}


def _architecture_note(twin_path: str) -> str:
    """Seed 000's bound needs the architecture's layers; an imported twin's is not in the zoo: say so."""
    from segmenters.importing.spec import is_imported
    from segmenters.spec import ModelSpec
    from segmenters.twin import read_checkpoint

    spec = ModelSpec.from_json(read_checkpoint(twin_path)["spec"])
    if not is_imported(spec):
        return ""
    return (f"\n{spec.arch} is an imported network, not a zoo architecture: the bound above is not computed for it "
            f"(seed 000's count needs the architecture's gate layers). The linear regions below are measured on "
            f"the network itself.\n")


def main() -> None:
    audit()
