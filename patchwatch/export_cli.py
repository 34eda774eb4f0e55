"""`patchwatch export onnx|tensorrt`: engines from twins, through the parity gate."""

from __future__ import annotations

import json
from pathlib import Path

import click

from patchwatch.options import device_option, parse_shape, parse_size, resolved_device

PRECISION_CHOICES = click.Choice(["fp32", "fp16", "int8"])


def _parity_options(command):
    for option in reversed(
        [
            click.option("--parity-data", help="real images for the gate: camvid, cityscapes, voc, shapes, or a "
                         "folder/glob (default: the dataset in the model's spec)"),
            click.option("--parity-count", type=int, default=16, show_default=True, help="images the gate runs on"),
            click.option("--parity-size", help="HEIGHTxWIDTH for gate images (default: the spec's input size)"),
            click.option("--data-root", help="dataset folder (default ../shared/data/...)"),
            click.option("--calibration-count", type=int, default=32, show_default=True,
                         help="training images INT8 calibrates on"),
            device_option("the engine and its reference twin run for the gate (fp32 with TF32 off)"),
            click.option("--quiet", is_flag=True, help="no progress bars"),
        ]
    ):
        command = option(command)
    return command


def _settings(parity_data, parity_count, parity_size, data_root, calibration_count):
    from export.pipeline import ParitySettings

    return ParitySettings(source=parity_data, count=parity_count, size=parse_size(parity_size), root=data_root,
                          calibration_count=calibration_count)


@click.group()
def export() -> None:
    """Export twins to ONNX / TensorRT engines, each checked against its twin by the parity gate."""


@export.command("onnx")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", help="ONNX path (default: beside the checkpoint, <arch>.onnx)")
@click.option("--precision", "precisions", type=PRECISION_CHOICES, multiple=True,
              help="also write reduced-precision graphs (repeatable): <out>.fp16.onnx, <out>.int8.onnx")
@click.option("--opset", type=int, default=18, show_default=True)
@_parity_options
def export_onnx_command(checkpoint, out, precisions, opset, device, quiet, **parity) -> None:
    """Export CHECKPOINT to ONNX (dynamic batch and size, ModelSpec in metadata) and gate it on real images."""
    device = resolved_device(device)
    from export import ParityError
    from export.onnx_export import OnnxExportError
    from export.pipeline import export_onnx_gated, precision_path
    from segmenters.data.common import DatasetError

    out = Path(out) if out else Path(checkpoint).with_suffix(".onnx")
    try:
        reports = export_onnx_gated(checkpoint, out, precisions=tuple(precisions), settings=_settings(**parity),
                                    opset=opset, progress=not quiet, device=device)
    except (ParityError, OnnxExportError, DatasetError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for report in reports.values():
        click.echo(report.text())
    click.echo(json.dumps({p: str(precision_path(out, p)) for p in reports}, indent=2))


@export.command("tensorrt")
@click.argument("onnx_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--twin", "checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the checkpoint the ONNX came from: the gate's reference")
@click.option("--out", help="plan path (default: <onnx stem>.<precision>.plan)")
@click.option("--precision", type=PRECISION_CHOICES, help="default: the ONNX graph's precision")
@click.option("--min-shape", help="NxCxHxW smallest input (default 1x3xHxW at the spec's size)")
@click.option("--opt-shape", help="NxCxHxW shape to tune for (default 1x3xHxW)")
@click.option("--max-shape", help="NxCxHxW largest input (default 8x3xHxW)")
@click.option("--workspace-mb", type=int, default=2048, show_default=True, help="builder workspace limit")
@_parity_options
def export_tensorrt_command(onnx_path, checkpoint, out, precision, min_shape, opt_shape, max_shape, workspace_mb,
                            device, quiet, **parity) -> None:
    """Build a TensorRT plan from ONNX_PATH for this GPU, record its target, and gate it against the twin."""
    from export.tensorrt_engine import tensorrt_missing_reason

    reason = tensorrt_missing_reason()
    if reason:  # say so before the device or any conversion
        raise click.ClickException(f"cannot build a TensorRT plan: {reason}")
    device = resolved_device("cuda" if device == "auto" else device)
    from export import EngineError, ParityError
    from export.onnx_export import model_metadata
    from export.pipeline import export_tensorrt_gated
    from export.tensorrt_engine import default_profile, read_plan_info

    spec, graph_precision = model_metadata(onnx_path)
    precision = precision or graph_precision
    profile = default_profile(spec)
    for key, value in (("min", min_shape), ("opt", opt_shape), ("max", max_shape)):
        if value:
            profile[key] = parse_shape(value)
    out = Path(out) if out else Path(onnx_path).with_name(f"{Path(onnx_path).name.split('.')[0]}.{precision}.plan")
    try:
        report = export_tensorrt_gated(onnx_path, checkpoint, out, precision=precision, profile=profile,
                                       workspace_bytes=workspace_mb << 20, settings=_settings(**parity),
                                       progress=not quiet, device=device)
    except (EngineError, ParityError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.text())
    click.echo(read_plan_info(out).model_dump_json(indent=2, exclude={"spec"}))
