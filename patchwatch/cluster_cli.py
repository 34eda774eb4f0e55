"""`patchwatch cluster up|down|status`: a local Ray head for `ray job submit`, started from this environment,
token-authenticated, running until `cluster down`; found again through its record in runs/cluster/."""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
from pathlib import Path

import click

STATE_DIR = "runs/cluster"

state_option = click.option(
    "--state-dir", default=STATE_DIR, show_default=True, type=click.Path(file_okay=False, path_type=Path),
    help="where the head's record, its token (mode 0600) and its log are kept")


@click.group()
def cluster() -> None:
    """A local Ray head for jobs (`ray job submit`): start it, check it, stop it."""


@cluster.command()
@state_option
@click.option("--num-cpus", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default="this machine's",
              help="logical CPUs the head offers to jobs and their tasks")
def up(state_dir: Path, num_cpus: int) -> None:
    """Start a Ray head on this machine, from this folder and this environment (its `audit` and `patchwatch` on
    the jobs' PATH), token-authenticated, detached: it runs until `patchwatch cluster down`. Prints how to submit
    jobs to it."""
    from serving.cluster import HEAD_LOG, HeadRecordError, record_head, recorded_head, start_head

    try:
        head, record = recorded_head(state_dir)
    except HeadRecordError:
        head = None
    if head is not None:
        if not head.answers():
            raise click.ClickException(f"the head recorded in {state_dir} (pid {record.pid}) runs but does not "
                                       "answer: stop it with `patchwatch cluster down` first")
        click.echo("already up")
        _describe(head, record, state_dir)
        return
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        head = start_head(num_cpus, detach_log=state_dir / HEAD_LOG)
    except FileNotFoundError as exc:
        raise click.ClickException(f"Ray is not installed in this environment ({exc}): "
                                   "pip install -e '.[serve]'") from exc
    except (RuntimeError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from exc
    record = record_head(head, state_dir)
    click.echo("up")
    _describe(head, record, state_dir)


@cluster.command()
@state_option
def status(state_dir: Path) -> None:
    """Whether the head `cluster up` started runs and its job API answers with its token (exit 0, with the same
    lines as `up`) or not (exit 1)."""
    from serving.cluster import HeadRecordError, recorded_head

    try:
        head, record = recorded_head(state_dir)
    except HeadRecordError as exc:
        click.echo(f"down: {exc}")
        sys.exit(1)
    if not head.answers():
        click.echo(f"not answering: the head's `ray start` (pid {record.pid}) runs, but its job API at "
                   f"{head.dashboard_url} does not answer with the recorded token; see {state_dir}/head.log")
        sys.exit(1)
    click.echo("up")
    _describe(head, record, state_dir)


@cluster.command()
@state_option
@click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="seconds the head has to stop before what is left of it is killed")
def down(state_dir: Path, timeout: float) -> None:
    """Stop the head `cluster up` started, and only that one (never `ray stop`, which ends every Ray cluster on
    the machine)."""
    from serving.cluster import HeadRecordError, forget_head, recorded_head

    try:
        head, record = recorded_head(state_dir)
    except HeadRecordError as exc:
        forget_head(state_dir)
        click.echo(f"nothing to stop: {exc}")
        return
    head.stop(timeout)
    forget_head(state_dir)
    click.echo(f"stopped the Ray head (pid {record.pid}) and every process it started")


@cluster.command("env")
@state_option
def env_command(state_dir: Path) -> None:
    """Print an `export` line for `ray job submit|list|logs|stop` against the head `cluster up` started:
    eval "$(patchwatch cluster env)". Its address goes in RAY_API_SERVER_ADDRESS, which Ray's job commands read and
    `ray.init` does not, so `audit campaign` run directly in that shell still starts a cluster of its own."""
    from serving.cluster import HeadRecordError, recorded_head

    try:
        head, _ = recorded_head(state_dir)
    except HeadRecordError as exc:
        raise click.ClickException(f"{exc}; start one with `patchwatch cluster up`") from exc
    click.echo("export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in _job_env(head, state_dir).items()))


def _job_env(head, state_dir: Path) -> dict[str, str]:
    """What Ray's job commands need to reach this head: its API server and its token (the file, not the token
    itself, so it stays out of shell history)."""
    from serving.cluster import TOKEN_FILE

    return {"RAY_API_SERVER_ADDRESS": head.dashboard_url, "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str((state_dir / TOKEN_FILE).resolve())}


def _describe(head, record, state_dir: Path) -> None:
    """The dashboard, what listens where, and the `ray job submit` lines to paste, filled in."""
    env = _job_env(head, state_dir)
    click.echo(f"dashboard: {head.dashboard_url}  (it asks for the token in {env['RAY_AUTH_TOKEN_PATH']})")
    click.echo(f"jobs run with {record.bin} first on their PATH; started from {record.cwd}")
    click.echo("listening (on loopback, as the head's node is; the GCS, the dashboard and its agent ask for the "
               "token, the metrics ports answer anyone on this machine):")
    for address, port, what in head.listeners():
        shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        click.echo(f"  {shown:<24} {what}{_reach(address)}")
    prefix = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    ray = shlex.quote(str(Path(record.bin) / "ray"))
    runs = Path(record.cwd) / "runs"
    click.echo(f"submit a job (it runs in {record.cwd}: relative paths mean what they mean there, outputs land "
               f"in {runs}/...):")
    click.echo(f"  {prefix} {ray} job submit -- audit campaign campaign.yaml --out runs/campaigns/NAME")
    click.echo("or ship the working dir's code with it (runs/, engines/, twins/, keys/, bundles and .venv stay "
               "behind: .gitignore, .rayignore), paths to what stays behind absolute:")
    click.echo(f"  {prefix} {ray} job submit --working-dir . -- audit campaign campaign.yaml "
               f"--out {shlex.quote(str(runs / 'campaigns' / 'NAME'))}")
    click.echo(f'in a shell: eval "$(patchwatch cluster env{_state_flag(state_dir)})", then `ray job '
               "submit|list|logs|stop`; stop the head: "
               f"patchwatch cluster down{_state_flag(state_dir)}")


def _state_flag(state_dir: Path) -> str:
    return "" if state_dir == Path(STATE_DIR) else f" --state-dir {shlex.quote(str(state_dir))}"


def _reach(address: str) -> str:
    ip = ipaddress.ip_address(address)
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_unspecified:
        return "  (all interfaces)"
    return "" if ip.is_loopback else "  (this machine's address)"
