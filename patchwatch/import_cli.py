"""`patchwatch import`: a segmentation network trained elsewhere becomes a twin, gated against its original."""

from __future__ import annotations

import json

import click


@click.command("import")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False),
              help="YAML sidecar: classes, input convention, output kind (README: Audit your own model)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the twin checkpoint to write (.pt)")
@click.option("--images", help="dataset name or image folder/glob the gate runs on (default: the spec's parity_images)")
@click.option("--count", type=click.IntRange(min=1), default=16, show_default=True, help="gate images")
@click.option("--factory", help="for a state dict: package.module:function that builds the network")
@click.option("--factory-kwargs", default="{}", show_default=True, help="JSON keyword arguments for --factory")
@click.option("--quiet", is_flag=True, help="no progress bars")
def import_model(model, spec_path, out, images, count, factory, factory_kwargs, quiet) -> None:
    """Import MODEL (.onnx, .pt2 torch.export program, TorchScript .pt/.ts, or a state dict with --factory) as a
    twin; refused, with nothing written, unless the twin matches the original on real images (fp32 gate)."""
    from export.imports import import_twin_gated
    from segmenters.importing.sources import ModelImportError
    from segmenters.importing.spec import ImportSpecError

    try:
        kwargs = json.loads(factory_kwargs)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--factory-kwargs") from exc
    if not isinstance(kwargs, dict):
        raise click.BadParameter("expected a JSON object", param_hint="--factory-kwargs")
    try:
        result = import_twin_gated(model, spec_path, out, images=images, count=count, factory=factory,
                                   factory_kwargs=kwargs, progress=not quiet)
    except (ModelImportError, ImportSpecError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(result.report.text(), err=True)
    click.echo(json.dumps({"twin": str(result.checkpoint), "arch": result.twin.spec.arch,
                           "format": result.source.format, "classes": result.twin.spec.class_names,
                           "notes": result.source.notes, "parity": f"{out}.parity.json"}, indent=2))
