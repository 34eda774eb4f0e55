"""`patchwatch` command line. Subcommands import their package lazily so `--help` stays fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from audit.cli import audit
from patchwatch.cluster_cli import cluster
from patchwatch.edge_cli import edge
from patchwatch.export_cli import export
from patchwatch.import_cli import import_model
from patchwatch.monitor_cli import monitor
from patchwatch.options import device_option, parse_size, resolved_device
from patchwatch.serve_cli import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="patchwatch")
def main() -> None:
    """Train, export, serve, attack and audit semantic-segmentation twins."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML TrainConfig; flags override it")
@click.option("--arch", help="zoo architecture (unet, deeplabv3_resnet18, lraspp_mobilenetv3, ...)")
@click.option("--dataset", help="shapes, camvid, cityscapes or voc")
@click.option("--data-root", help="dataset folder (default ../shared/data/...)")
@click.option("--loss", type=click.Choice(["ppce", "sobel", "semeda"]))
@click.option("--lambdas", help="comma-separated loss weights, e.g. 4,2,0 for SEMEDA")
@click.option("--size", help="HEIGHTxWIDTH images are brought to")
@click.option("--crop", help="HEIGHTxWIDTH training crop (real data)")
@click.option("--epochs", type=int, help="passes over the training set")
@click.option("--max-steps", type=int, help="optimiser steps in all: SEMEDA pretraining batches plus training steps")
@click.option("--semeda-pretrain-batches", type=click.IntRange(min=1),
              help="SEMEDA: batches (one optimiser step each) that pretrain the edge network first (default 300)")
@click.option("--bn-recalibration-batches", type=click.IntRange(min=0),
              help="training batches batch-norm statistics are recomputed over before each validation (so each "
                   "best.pt and the final last.pt; default 10; 0: off)")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--train-length", type=int, help="synthetic scenes to train on")
@click.option("--val-length", type=int, help="synthetic scenes to validate on")
@click.option("--seed", type=int)
@click.option("--threads", type=int)
@click.option("--eval-every", type=int, help="validate after epoch 1, every N epochs and after the last")
@click.option("--compile/--no-compile", "compile", default=None,
              help="torch.compile the training step (default: on CUDA only)")
@device_option("to train (default: the config's, auto)", default=None)
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]),
              help="mixed precision (default auto: bf16 on CUDA where the GPU has it, else fp16; off on the CPU)")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers (default: a few on CUDA, 0 on the CPU)")
@click.option("--out", help="run folder (checkpoints, history, plots)")
@click.option("--resume", is_flag=True, help="continue from OUT/last.pt")
@click.option("--quiet", is_flag=True, help="no progress bars")
def train(config_path, lambdas, size, crop, resume, quiet, **flags) -> None:
    """Train a twin (default: the U-Net on synthetic shapes at 128x128)."""
    from pydantic import ValidationError

    from segmenters.device import DeviceError
    from segmenters.training import TrainConfig, TrainSetupError, train as run_training

    overrides = {k: v for k, v in flags.items() if v is not None}
    if lambdas:
        overrides["lambdas"] = tuple(float(v) for v in lambdas.split(","))
    if size:
        overrides["size"] = parse_size(size)
    if crop:
        overrides["crop"] = parse_size(crop)
    try:
        config = (
            TrainConfig.from_yaml(config_path, **overrides) if config_path else TrainConfig.model_validate(overrides)
        )
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        summary = run_training(config, resume=resume, progress=not quiet)
    except (DeviceError, TrainSetupError) as exc:  # raised before anything is rendered or written
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary, indent=2))


@main.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", help="default: the dataset named in the checkpoint's ModelSpec")
@click.option("--split", default="val", show_default=True)
@click.option("--data-root")
@click.option("--size", help="HEIGHTxWIDTH (default: the spec's input size)")
@click.option("--length", type=int, default=300, show_default=True, help="synthetic scenes to evaluate")
@click.option("--limit", type=int, help="evaluate at most this many images")
@click.option("--overlays", type=int, default=8, show_default=True, help="overlay panels to write")
@click.option("--out", help="report folder (default: beside the checkpoint, eval-<dataset>-<split>)")
@device_option("the twin runs")
@click.option("--quiet", is_flag=True)
def eval_command(checkpoint, dataset, split, data_root, size, length, limit, overlays, out, device, quiet) -> None:
    """Evaluate a twin: mIoU, per-class IoU, F1, E-measure, trimap mIoU; JSON report and PNG overlays."""
    from segmenters.data import DatasetError, build_dataset
    from segmenters.evaluate import evaluate
    from segmenters.twin import load_twin

    where = resolved_device(device)
    try:
        twin = load_twin(checkpoint, map_location=where)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    dataset = dataset or twin.spec.dataset
    if dataset != twin.spec.dataset:
        click.echo(f"note: model trained on {twin.spec.dataset}, evaluated on {dataset}", err=True)
    try:
        data = build_dataset(dataset, split, root=data_root, size=parse_size(size) or twin.spec.input_size, length=length)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    out = Path(out) if out else Path(checkpoint).parent / f"eval-{dataset}-{split}"
    report = evaluate(twin, data, out_dir=out, overlays=overlays, limit=limit, progress=not quiet)
    for warning in report["warnings"]:  # the one-class check: reported loudly, never a failure
        click.echo(f"WARNING: {checkpoint} on {dataset}/{split}: {warning}", err=True)
    brief = {k: report[k] for k in ("miou", "pixel_accuracy", "mean_f1", "mean_e_measure", "images", "warnings")}
    click.echo(json.dumps({**brief, "report": str(out / "report.json")}, indent=2))


@main.command()
@click.option("--out", default="runs/demo", show_default=True, help="demo folder (a trained twin there is reused)")
@click.option("--quick", is_flag=True, help="a smaller twin and campaign (a smoke run, about 3 minutes)")
@device_option("training, the gate, the served engine, trials and audits run (on a GPU the replica and each "
               "Ray task take a quarter of it)")
def demo(out, quick, device) -> None:
    """The whole story locally: train, export, serve, attack (Ray job), audit (Ray job), monitor a camera where the
    found patch appears, and write an HTML report (its path is printed)."""
    from patchwatch.demo import run_demo

    page = run_demo(out, quick=quick, device=resolved_device(device))
    click.echo(str(page.resolve()))


main.add_command(audit)
main.add_command(export)
main.add_command(import_model)
main.add_command(edge)
main.add_command(serve)
main.add_command(monitor)
main.add_command(cluster)


if __name__ == "__main__":
    sys.exit(main())
