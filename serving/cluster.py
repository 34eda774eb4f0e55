"""A local Ray cluster with the patchwatch application on it: what `patchwatch serve`, the tests and the
serving benchmark start, and stop again."""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass

from serving.config import ServeConfig

APP_NAME = "patchwatch"


@dataclass
class LocalService:
    config: ServeConfig
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def urls(self) -> dict[str, str]:
        """What a person needs to reach the service, by purpose."""
        out = {"server metadata": f"{self.url}/v2", "live": f"{self.url}/v2/health/live",
               "ready": f"{self.url}/v2/health/ready", "metrics": f"{self.url}/metrics",
               "metrics (Ray node)": f"http://127.0.0.1:{self.metrics_port}/metrics"}
        for name in dict.fromkeys(m.name for m in self.config.models):
            out[f"{name} metadata"] = f"{self.url}/v2/models/{name}"
            out[f"{name} infer"] = f"{self.url}/v2/models/{name}/infer"
            out[f"{name} segment"] = f"{self.url}/v2/models/{name}/segment"
        return out

    def stop(self) -> None:
        stop_local()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for tests and benchmarks that start a service)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ray_cpus(config: ServeConfig) -> int:
    """Logical CPUs for the local cluster: enough to place every replica at its largest, however few cores
    the machine has (logical CPUs only gate placement; the OS shares the real cores)."""
    needed = 0.5 * config.ingress_replicas
    for model in config.models:
        replicas = model.autoscaling.max_replicas if model.autoscaling else model.num_replicas
        needed += model.num_cpus * replicas
    return max(os.cpu_count() or 1, math.ceil(needed) + 1)


def start_local(config: ServeConfig, metrics_port: int = 8080, timeout_s: float = 180.0) -> LocalService:
    """Start Ray on this machine, Serve's proxy on `config.host:config.port`, and the application; returns once
    every model answers."""
    import ray
    from ray import serve

    from serving.app import build_app

    config.api_key()  # a named but unset key variable fails here, before anything starts
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address="local", include_dashboard=False, num_cpus=ray_cpus(config), log_to_driver=False,
             _metrics_export_port=metrics_port, configure_logging=False)
    if callable(sigterm):
        # ray.init installs a SIGTERM handler that aborts the process; keep the caller's (a clean stop)
        signal.signal(signal.SIGTERM, sigterm)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        _wait_ready(config, timeout_s)
    except BaseException:
        stop_local()
        raise
    return LocalService(config, metrics_port)


def _wait_ready(config: ServeConfig, timeout_s: float) -> None:
    import requests

    url = f"http://{config.host}:{config.port}/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = requests.get(url, timeout=5)
            if answer.status_code == 200:
                return
            last = answer.text
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"the service at {url} was not ready within {timeout_s:.0f} s: {last}")


def stop_local() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
