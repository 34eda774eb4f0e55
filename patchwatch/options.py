"""Command-line value parsers shared by every `patchwatch` subcommand."""

from __future__ import annotations

import click

from segmenters.device import DEVICE_HELP


def device_option(what: str, default: str | None = "auto"):
    """`--device`: the one device flag of every command; `what` says what runs there."""
    return click.option("--device", default=default, show_default=default is not None,
                        help=f"where {what}: {DEVICE_HELP}")


def resolved_device(request: str):
    """`--device`'s value resolved before any work, or a usage error naming the device."""
    from segmenters.device import DeviceError, resolve_device

    try:
        return resolve_device(request)
    except DeviceError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc


def parse_size(value: str | None) -> tuple[int, int] | None:
    """"360x480" -> (360, 480) as (height, width)."""
    if value is None:
        return None
    try:
        height, width = (int(v) for v in value.lower().split("x"))
    except ValueError as exc:
        raise click.BadParameter(f"expected HEIGHTxWIDTH such as 180x240, got {value!r}") from exc
    if height <= 0 or width <= 0:
        raise click.BadParameter(f"sizes must be positive, got {value!r}")
    return height, width


def parse_shape(value: str | None) -> tuple[int, int, int, int] | None:
    """"8x3x360x480" -> (8, 3, 360, 480) as (batch, channels, height, width)."""
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.lower().split("x"))
    except ValueError as exc:
        raise click.BadParameter(f"expected NxCxHxW such as 1x3x360x480, got {value!r}") from exc
    if len(shape) != 4 or shape[1] != 3 or min(shape) <= 0:
        raise click.BadParameter(f"expected NxCxHxW with C = 3, got {value!r}")
    return shape
