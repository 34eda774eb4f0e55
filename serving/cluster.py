"""A local Ray cluster with the patchwatch application on it: what `patchwatch serve`, the tests and the
serving benchmark start, and stop again."""

from __future__ import annotations

import math
import os
import signal
import sys
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


def start_local(config: ServeConfig, metrics_port: int = 8080, timeout_s: float = 180.0,
                address: str | None = None) -> LocalService:
    """Start Ray on this machine (or join the cluster at `address`, e.g. a `start_head` head), Serve's proxy on
    `config.host:config.port`, and the application; returns once every model answers."""
    import ray
    from ray import serve

    from serving.app import build_app

    config.api_key()  # a named but unset key variable fails here, before anything starts
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=ray_cpus(config), log_to_driver=False,
                 _metrics_export_port=metrics_port, configure_logging=False)
    if callable(sigterm):
        # ray.init installs a SIGTERM handler that aborts the process; keep the caller's (a clean stop)
        signal.signal(signal.SIGTERM, sigterm)
    try:
        _start_serve({"host": config.host, "port": config.port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        _wait_ready(config, timeout_s)
    except BaseException:
        stop_local()
        raise
    return LocalService(config, metrics_port)


def _start_serve(http_options: dict) -> None:
    """`serve.start`, and once more when its proxy was replaced while starting: on a loaded machine Serve's controller
    restarts a proxy that is slow to come up, and the first call's wait for it fails with the old one. The second
    call joins the running controller; `_wait_ready` then waits for the new proxy within the caller's timeout."""
    from ray import serve
    from ray.exceptions import ActorDiedError

    try:
        serve.start(http_options=http_options)
    except (ActorDiedError, TimeoutError) as exc:
        print(f"patchwatch: Serve's proxy was not up in time ({type(exc).__name__}); waiting for its replacement",
              file=sys.stderr)
        serve.start(http_options=http_options)


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


@dataclass
class RayHead:
    """A Ray head started with `ray start --head --block` on 127.0.0.1, every port chosen free (so it runs beside
    other clusters on the machine), token-authenticated; `stop()` ends this cluster and only this one."""

    process: object
    gcs_address: str
    dashboard_url: str
    env: dict

    def submit(self, entrypoint: list[str], working_dir: str | None = None, timeout: float = 900.0):
        """`ray job submit --address DASHBOARD [--working-dir DIR] -- ENTRYPOINT`, as a user types it, waiting
        for the job to end; retried while the head's job agent is still starting (it answers "No available agent
        to submit job" then and submits nothing). Returns the CompletedProcess."""
        import shutil
        import subprocess
        import sys
        from pathlib import Path

        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        command = [ray, "job", "submit", "--address", self.dashboard_url,
                   *(["--working-dir", str(working_dir)] if working_dir else []), "--", *entrypoint]
        deadline = time.monotonic() + 120
        while True:
            done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
                return done
            time.sleep(2)

    def stop(self, timeout: float = 60.0) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # --block tears down what it started
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _terminate_with_parent():
    """For the `ray start --head --block` child: SIGTERM when whoever started it dies, even by SIGKILL (a timed-out
    test, a killed demo), and `--block` then stops every process of that head instead of leaving them running.
    The libc function is looked up here, in the parent: the child, forked from a threaded process, only calls it.
    Linux sends the signal when the starting *thread* ends: start heads from a thread that lives as long as they
    should (the main thread, as the demo and the tests do)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return None
    prctl, pr_set_pdeathsig = ctypes.CDLL(None, use_errno=True).prctl, 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_head(num_cpus: int, timeout_s: float = 120.0) -> RayHead:
    """Start a local head for jobs (`ray job submit --address RayHead.dashboard_url`) and drivers
    (`ray.init(address=RayHead.gcs_address)`, with `RayHead.env`'s RAY_AUTH_* in the environment before Ray is
    first imported: Ray reads its auth mode at import)."""
    import secrets
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import requests

    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    # jobs run their entrypoints (`audit campaign ...`) with the head's PATH: put this environment's commands on it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    names = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port")
    chosen: set[int] = set()
    while len(chosen) < len(names):  # a port freed by one probe can come back from the next: Ray wants them distinct
        chosen.add(free_port())
    ports = dict(zip(names, sorted(chosen)))
    command = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--num-cpus={num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
               *(f"--{name}={port}" for name, port in ports.items())]
    log = tempfile.NamedTemporaryFile("w+", prefix="ray-head-", suffix=".log", delete=False)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_terminate_with_parent())
    head = RayHead(process, f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['dashboard-port']}", env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start failed: {Path(log.name).read_text()[-2000:]}")
        try:
            # any answer will do: with token auth the dashboard says 401 to a request without the token
            if requests.get(f"{head.dashboard_url}/api/version", timeout=2).status_code < 500:
                return head
        except requests.RequestException:
            pass
        time.sleep(0.5)
    head.stop()
    raise TimeoutError(f"the Ray head's dashboard did not answer within {timeout_s:.0f} s")
