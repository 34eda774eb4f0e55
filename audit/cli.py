"""`audit` command line, also reachable as `patchwatch audit`, so that
`ray job submit -- audit campaign cfg.yaml` reads like what it does. Its commands arrive with the
campaign and VGatt issues."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def audit() -> None:
    """Attack campaigns, VGatt attribution audits and complexity bounds."""


def main() -> None:
    audit()
