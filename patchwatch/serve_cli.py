"""`patchwatch serve`: a local Ray cluster with the inference service on it, until Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import click


def parse_model(text: str, defaults: dict) -> dict:
    """`NAME[:VERSION]=PATH` or `PATH` (named after the file: model.fp16.onnx -> model-fp16) -> a ModelConfig dict."""
    name, version = None, "1"
    if "=" in text:
        key, text = text.split("=", 1)
        name, _, given_version = key.partition(":")
        version = given_version or version
    path = Path(text).expanduser().resolve()  # replicas run elsewhere: they need an absolute path
    if not path.is_file():
        raise click.BadParameter(f"no engine file at {path}", param_hint="MODELS")
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", path.name.removesuffix(path.suffix)).strip("-_") or "model"
    return {**defaults, "name": name, "version": version, "path": str(path)}


#: how often the idle service wakes to act on a Ctrl-C or SIGTERM
SIGNAL_CHECK_S = 0.5


def _interrupt(signum, frame) -> None:
    """SIGTERM (from a supervisor or a test) stops the service as cleanly as Ctrl-C."""
    raise KeyboardInterrupt


def stop_hint() -> str:
    """How this process can be stopped: a background job of a script (`patchwatch serve ... &`) inherits SIGINT
    ignored, and then Ctrl-C never reaches it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return "ready; SIGTERM stops the service (it ignores Ctrl-C: SIGINT was ignored when it started)"
    return "ready; Ctrl-C stops the service"


@click.command()
@click.argument("models", nargs=-1)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="ServeConfig YAML (or a Serve config file such as deploy/serve_config.yaml) instead of MODELS")
@click.option("--host", help="address the HTTP proxy listens on [default 127.0.0.1]")
@click.option("--port", type=int, help="HTTP port [default 8000]")
@click.option("--grpc-port", type=int, help="also serve the Open Inference Protocol over gRPC here [default off]")
@click.option("--direct-port", type=int, help="also serve HTTP from the ingress replicas themselves here, without the "
              "hop through Serve's proxy (for clients on the ingress's node) [default off]")
@click.option("--api-key-env", help="environment variable holding the API key (required off loopback)")
@click.option("--max-batch-size", type=int, default=8, show_default=True, help="images per engine run")
@click.option("--batch-wait-ms", type=float, default=0.0, show_default=True,
              help="how long a batch waits to fill (0: batches form from what queued while the engine ran)")
@click.option("--replicas", type=int, default=1, show_default=True, help="replicas per model")
@click.option("--threads", type=int, help="ONNX Runtime threads per replica")
@click.option("--gpus", type=float, default=0.0, show_default=True, help="GPUs per replica")
@click.option("--max-body-mb", type=float, help="largest request body [default 64]")
@click.option("--metrics-port", type=int, default=8080, show_default=True, help="Ray's Prometheus port")
@click.option("--address", help="join the Ray cluster at this GCS address (e.g. `patchwatch cluster up`'s head; its "
              "RAY_AUTH_MODE/RAY_AUTH_TOKEN in the environment) instead of starting one [default: a local cluster]")
def serve(models, config_path, host, port, grpc_port, direct_port, api_key_env, max_batch_size, batch_wait_ms, replicas,
          threads, gpus, max_body_mb, metrics_port, address) -> None:
    """Serve engines over the Open Inference Protocol (KServe v2 REST) on a local Ray cluster.

    MODELS are engine files, each `PATH` or `NAME[:VERSION]=PATH`, e.g.
    `patchwatch serve camvid=runs/x/model.onnx camvid:2=runs/y/model.onnx`.
    """
    from pydantic import ValidationError

    from serving.cluster import start_local
    from serving.config import ServeConfig, ServeConfigError, load_serve_config

    if bool(models) == bool(config_path):
        raise click.UsageError("give engine files (MODELS) or --config, one of the two")
    overrides = {k: v for k, v in {"host": host, "port": port, "grpc_port": grpc_port, "direct_port": direct_port,
                                    "api_key_env": api_key_env, "max_body_mb": max_body_mb}.items() if v is not None}
    try:
        if config_path:
            config = load_serve_config(config_path).model_copy(update=overrides)
            config = ServeConfig.model_validate(config.model_dump())
        else:
            defaults = {"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms, "num_replicas": replicas,
                        "threads": threads, "num_gpus": gpus}
            config = ServeConfig(models=[parse_model(m, defaults) for m in models], **overrides)
        config.api_key()
    except (ValidationError, ServeConfigError) as exc:
        raise click.ClickException(str(exc)) from exc

    signal.signal(signal.SIGTERM, _interrupt)
    click.echo(f"starting Ray and Serve for {len(config.models)} model(s) ...", err=True)
    try:
        service = start_local(config, metrics_port=metrics_port, address=address)
    except KeyboardInterrupt:
        click.echo("stopped while starting", err=True)
        return
    try:
        click.echo(json.dumps({"serving": service.url, "auth": bool(config.api_key_env), "urls": service.urls()},
                              indent=2))
        sys.stdout.flush()
        click.echo(stop_hint(), err=True)
        while True:
            # short sleeps: a Ctrl-C that one of Ray's threads takes only sets Python's flag, which the main thread
            # acts on when it next wakes (asleep for an hour, the service ignored Ctrl-C for up to an hour)
            time.sleep(SIGNAL_CHECK_S)
    except KeyboardInterrupt:
        click.echo("stopping ...", err=True)
    finally:
        service.stop()
