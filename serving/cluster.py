"""A local Ray cluster with the patchwatch application on it: what `patchwatch serve`, the tests and the
serving benchmark start, and stop again. And local Ray heads for jobs (`start_head`): the demo's and the tests',
which end with their starter, and the one `patchwatch cluster up` leaves running, recorded on disk for
`cluster status|down` (`record_head`, `recorded_head`)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from serving.config import ServeConfig, is_loopback

APP_NAME = "patchwatch"


@dataclass
class LocalService:
    config: ServeConfig
    metrics_port: int
    owns_cluster: bool = True  # started its own local cluster (else joined one at an address)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def grpc_address(self) -> str | None:
        """`host:port` of the OIP gRPC service (what `tritonclient.grpc.InferenceServerClient` takes), if on."""
        return None if self.config.grpc_port is None else f"{self.config.host}:{self.config.grpc_port}"

    @property
    def direct_url(self) -> str | None:
        """The HTTP service the ingress replicas serve themselves (no hop through Serve's proxy), if on."""
        return None if self.config.direct_port is None else f"http://{self.config.host}:{self.config.direct_port}"

    def urls(self) -> dict[str, str]:
        """What a person needs to reach the service, by purpose."""
        out = {"server metadata": f"{self.url}/v2", "live": f"{self.url}/v2/health/live",
               "ready": f"{self.url}/v2/health/ready", "metrics": f"{self.url}/metrics",
               "metrics (Ray node)": f"http://127.0.0.1:{self.metrics_port}/metrics"}
        if self.config.grpc_port is not None:
            out["grpc"] = self.grpc_address
        if self.config.direct_port is not None:
            out["direct http"] = self.direct_url
        for name in dict.fromkeys(m.name for m in self.config.models):
            out[f"{name} metadata"] = f"{self.url}/v2/models/{name}"
            out[f"{name} infer"] = f"{self.url}/v2/models/{name}/infer"
            out[f"{name} segment"] = f"{self.url}/v2/models/{name}/segment"
        return out

    def stop(self) -> None:
        stop_local(self.owns_cluster)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for tests and benchmarks that start a service)."""
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
    config.api_key()  # a named but unset key variable fails here, before anything starts
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        # a head on loopback (`start_head`'s) is reached as such only by a driver that imported ray the same way
        with ray_node_on_loopback() if is_loopback(address.rsplit(":", 1)[0]) else contextlib.nullcontext():
            import ray

            ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # a node of its own, on loopback whatever `config.host` is: Serve's proxy binds that host itself, and the
        # node's metrics export (no key) stays off the network, where the service's `GET /metrics` (key) serves it
        with ray_node_on_loopback():
            import ray  # reads LOOPBACK_NODE_VARIABLE when this process first imports it

            ray.init(address="local", include_dashboard=False, num_cpus=ray_cpus(config), log_to_driver=False,
                     _metrics_export_port=metrics_port, configure_logging=False)
        _warn_if_node_exposed()
    from ray import serve

    from serving.app import build_app
    from serving.repository import external_scaling

    if callable(sigterm):
        # ray.init installs a SIGTERM handler that aborts the process; keep the caller's (a clean stop)
        signal.signal(signal.SIGTERM, sigterm)
    try:
        _start_serve({"host": config.host, "port": config.port}, config.proxy_location)
        with _quiet_reconnect():
            serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False,
                      external_scaler_enabled=external_scaling(config))  # the repository's load/unload
        wait_ready(f"http://{config.host}:{config.port}", timeout_s)
    except BaseException:
        if address:
            stop_local(owns_cluster=False)
        else:
            ray.shutdown()  # the cluster's end takes whatever was started on it
        raise
    return LocalService(config, metrics_port, owns_cluster=not address)


#: Ray 2.60 puts a node it starts on 127.0.0.1, and with it every socket that node binds (GCS, raylet, object
#: manager, workers, dashboard and runtime env agents, metrics export), only when this variable is false as the
#: process first imports ray; otherwise the node takes the address that routes off the machine, even when given
#: `--node-ip-address=127.0.0.1`, and binds its gRPC servers and metrics export on all interfaces. Such a node
#: cannot be joined from another machine, which is the point for a single-node service or a head for this machine.
LOOPBACK_NODE_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_node_on_loopback():
    """Sets LOOPBACK_NODE_VARIABLE false while a local Ray node starts (and ray is first imported), then restores
    it, so that no later `ray start` of this process's children inherits it (a joining node refuses to start
    with it)."""
    before = os.environ.get(LOOPBACK_NODE_VARIABLE)
    os.environ[LOOPBACK_NODE_VARIABLE] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LOOPBACK_NODE_VARIABLE, None)
        else:
            os.environ[LOOPBACK_NODE_VARIABLE] = before


def _warn_if_node_exposed() -> None:
    """A local node that did not get loopback: this process imported ray before `start_local` could set
    LOOPBACK_NODE_VARIABLE, and Ray's ports (its metrics export included) listen on all interfaces."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        print(f"patchwatch: WARNING: Ray's node is on {node_ip}, not loopback: its ports, the metrics export among "
              f"them, listen on all interfaces (ray was imported before the service started; set "
              f"{LOOPBACK_NODE_VARIABLE}=0 before importing it)", file=sys.stderr)


def service_process_ids() -> dict[str, int]:
    """The processes serving the application on the connected cluster, by Serve actor name: the HTTP proxy, the
    ingress and the model replicas (each asked for its own PID; for memory and socket checks)."""
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if actor["namespace"] == "serve" and name.startswith((f"SERVE_REPLICA::{APP_NAME}#", "SERVE_PROXY_ACTOR")):
            handle = ray.get_actor(name, namespace="serve")
            pids[name] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    return pids


class _DropReconnect(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Connecting to existing Serve app")


@contextlib.contextmanager
def _quiet_reconnect():
    """`serve.run` joins the Serve instance `serve.start` has just started (the only way to give Serve its HTTP
    options) and logs that as "Connecting to existing Serve app ... New http_options will not be applied", which
    reads as if an old app were reused on a fresh start; it passes no options, so nothing is lost. Drop that line."""
    serve_logger, quiet = logging.getLogger("ray.serve"), _DropReconnect()
    serve_logger.addFilter(quiet)
    try:
        yield
    finally:
        serve_logger.removeFilter(quiet)


def _start_serve(http_options: dict, proxy_location: str) -> None:
    """`serve.start`, and once more when its proxy was replaced while starting: on a loaded machine Serve's controller
    restarts a proxy that is slow to come up, and the first call's wait for it fails with the old one. The second
    call joins the running controller; `wait_ready` then waits for the new proxy within the caller's timeout."""
    from ray import serve
    from ray.exceptions import ActorDiedError

    try:
        serve.start(http_options=http_options, proxy_location=proxy_location)
    except (ActorDiedError, TimeoutError) as exc:
        print(f"patchwatch: Serve's proxy was not up in time ({type(exc).__name__}); waiting for its replacement",
              file=sys.stderr)
        serve.start(http_options=http_options, proxy_location=proxy_location)


def wait_ready(url: str, timeout_s: float, running=lambda: True) -> None:
    """Returns once the service at `url` answers `GET /v2/health/ready` with 200; raises TimeoutError after
    `timeout_s`, or RuntimeError as soon as `running()` says the process serving it has ended."""
    import requests

    ready = f"{url}/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not running():
            raise RuntimeError(f"the service at {url} ended before it was ready: {last}")
        try:
            answer = requests.get(ready, timeout=5)
            if answer.status_code == 200:
                return
            last = answer.text
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"the service at {ready} was not ready within {timeout_s:.0f} s: {last}")


def stop_local(owns_cluster: bool = True) -> None:
    """Stop the application and leave Ray. On a cluster of its own the application is deleted (its replicas finish
    what they hold) and the cluster's end takes Serve's controller and proxy with it: `serve.shutdown` has Ray log
    its controller's intended death as a failed task ("graceful_shutdown failed ... infinite retries remaining").
    On a joined cluster Serve is shut down, so nothing of it stays there (and Ray logs that line)."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if not ray.is_initialized():
        return
    try:
        if owns_cluster:
            with contextlib.suppress(RayServeException):  # Serve was never started
                serve.delete(APP_NAME)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()


#: the ports `ray start` is given, each chosen free, and what listens on them; workers and actors take ports of
#: Ray's own choosing
HEAD_PORTS = {"port": "GCS", "dashboard-port": "dashboard", "dashboard-agent-listen-port": "dashboard agent (HTTP)",
              "dashboard-agent-grpc-port": "dashboard agent (gRPC)", "runtime-env-agent-port": "runtime env agent",
              "metrics-export-port": "metrics", "ray-client-server-port": "Ray client server",
              "node-manager-port": "raylet", "object-manager-port": "object manager"}
#: ports Ray takes from the environment instead (fixed defaults otherwise: 44217, 44227, shared by every head)
HEAD_PORT_VARIABLES = {"AUTOSCALER_METRIC_PORT": "autoscaler metrics", "DASHBOARD_METRIC_PORT": "dashboard metrics"}
#: the most entries one state-API listing returns (nodes, actors): more than a test's or a small cluster's
STATE_API_LIMIT = 10_000
#: what `record_head` writes into its state folder
HEAD_RECORD, TOKEN_FILE, HEAD_LOG = "head.json", "auth_token", "head.log"


@dataclass
class RayHead:
    """A Ray head started with `ray start --head --block` on 127.0.0.1, every port chosen free (so it runs beside
    other clusters on the machine), token-authenticated; `stop()` ends this cluster and only this one."""

    process: object  # the `ray start --block` process: a subprocess.Popen, or a psutil.Process for a recorded head
    gcs_address: str
    dashboard_url: str
    env: dict
    ports: dict = field(default_factory=dict)  # `ray start` option (HEAD_PORTS) or variable (HEAD_PORT_VARIABLES) -> port

    @property
    def token(self) -> str:
        return self.env["RAY_AUTH_TOKEN"]

    def submit(self, entrypoint: list[str], working_dir: str | None = None, timeout: float = 900.0):
        """`ray job submit --address DASHBOARD [--working-dir DIR] -- ENTRYPOINT`, as a user types it, waiting
        for the job to end; retried while the head's job agent is still starting (it answers "No available agent
        to submit job" then and submits nothing). Returns the CompletedProcess."""
        command = [ray_command(), "job", "submit", "--address", self.dashboard_url,
                   *(["--working-dir", str(working_dir)] if working_dir else []), "--", *entrypoint]
        deadline = time.monotonic() + 120
        while True:
            done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
                return done
            time.sleep(2)

    def answers(self, timeout: float = 5.0) -> bool:
        """Whether the head's job API answers a request that carries this head's token."""
        import requests

        try:
            answer = requests.get(f"{self.dashboard_url}/api/jobs/", timeout=timeout,
                                  headers={"Authorization": f"Bearer {self.token}"})
        except requests.RequestException:
            return False
        return answer.status_code == 200

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the head's state API lists them (`node_id`, `node_ip`, `state`, `is_head_node`,
        `resources_total`...), dead ones included; [] while it does not answer."""
        return self._state("nodes")

    def actors(self) -> list[dict]:
        """The cluster's actors as the state API lists them (`class_name`, `state`, `node_id`, `pid`...)."""
        return self._state("actors")

    def replica_nodes(self, deployment: str) -> list[str]:
        """The node of each live replica of `deployment`. Serve names a replica's actor class
        `ServeReplica:<app>:<deployment>`: match the whole last part, so shapes_v1 never counts shapes_v10's."""
        return [actor["node_id"] for actor in self.actors() if actor["state"] == "ALIVE"
                and actor["class_name"].startswith("ServeReplica:") and actor["class_name"].endswith(f":{deployment}")]

    def wait_replica_on_each_node(self, deployment: str, timeout_s: float) -> list[str]:
        """Polls until each live node holds a replica of `deployment`; returns the replicas' nodes. A ready service
        has one replica answering, so the others may still be starting. TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            placed = self.replica_nodes(deployment)
            alive = {node["node_id"] for node in self.nodes() if node["state"] == "ALIVE"}
            if alive and alive <= set(placed):
                return placed
            if time.monotonic() > deadline:
                raise TimeoutError(f"{deployment}: no replica on each of {len(alive)} nodes within {timeout_s:.0f} s "
                                   f"(replicas on {placed})")
            time.sleep(0.5)

    def _state(self, kind: str) -> list[dict]:
        import requests

        try:
            answer = requests.get(f"{self.dashboard_url}/api/v0/{kind}", params={"limit": STATE_API_LIMIT, "detail": "true"},
                                  headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        except requests.RequestException:
            return []
        if answer.status_code != 200:
            return []
        return answer.json().get("data", {}).get("result", {}).get("result", [])

    def listeners(self) -> list[tuple[str, int, str]]:
        """(address, port, what) for every socket the head's processes listen on now, as the OS reports them."""
        import psutil

        what = {**HEAD_PORTS, **HEAD_PORT_VARIABLES}
        named = {port: what.get(option, option) for option, port in self.ports.items()}
        found = set()
        for proc in _process_tree(self.process):
            try:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add((conn.laddr.ip, conn.laddr.port, named.get(conn.laddr.port) or _process_label(proc)))
            except psutil.Error:  # ended meanwhile, or not ours to inspect
                continue
        return sorted(found, key=lambda row: (row[1], row[0]))

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to `ray start --block`, which tears down what it started; whatever of its process tree still
        runs `timeout` s later is killed (a detached head has no starter left to end its processes)."""
        _stop_tree(self.process, timeout)


def _stop_tree(process, timeout: float) -> None:
    import psutil

    family = _process_tree(process)
    if family:
        with contextlib.suppress(psutil.NoSuchProcess):
            family[0].send_signal(signal.SIGTERM)
        for proc in _wait_gone(family, timeout):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        _wait_gone(family, timeout)
    if isinstance(process, subprocess.Popen):
        process.poll()  # reap it


def _process_tree(process) -> list:
    """The `ray start` process and its descendants as psutil sees them now ([] once it has ended)."""
    import psutil

    if isinstance(process, subprocess.Popen) and process.poll() is not None:
        return []
    try:
        root = process if isinstance(process, psutil.Process) else psutil.Process(process.pid)
        return [root, *root.children(recursive=True)] if _running(root) else []
    except psutil.NoSuchProcess:
        return []


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list, timeout: float) -> list:
    """Waits until none of `procs` runs (a zombie counts as ended) or `timeout` passed; returns those still running."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _process_label(proc) -> str:
    """A short name for a listener on a port of Ray's choosing: the actor (`ray::DashboardAgent`), the Python
    script (`monitor.py`) or the executable."""
    name = proc.name()
    if name.startswith("ray::"):
        return name
    script = next((arg for arg in proc.cmdline()[1:] if arg.endswith(".py")), None)
    return os.path.basename(script) if script else name


def _terminate_with_parent():
    """For the `ray start --head --block` child: SIGTERM when whoever started it dies, even by SIGKILL (a timed-out
    test, a killed demo), and `--block` then stops every process of that head instead of leaving them running.
    The libc function is looked up here, in the parent: the child, forked from a threaded process, only calls it.
    Linux sends the signal when the starting *thread* ends: start heads from a thread that lives as long as they
    should (the main thread, as the demo and the tests do)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    prctl, pr_set_pdeathsig = ctypes.CDLL(None, use_errno=True).prctl, 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def ray_command() -> str:
    """This environment's `ray` (the one beside the running Python), else whichever is on PATH."""
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _free_head_ports() -> dict[str, int]:
    return _distinct_free_ports([*HEAD_PORTS, *HEAD_PORT_VARIABLES])


def _distinct_free_ports(names: list[str]) -> dict[str, int]:
    chosen: set[int] = set()
    while len(chosen) < len(names):  # a port freed by one probe can come back from the next: Ray wants them distinct
        chosen.add(free_port())
    return dict(zip(names, sorted(chosen)))


def start_head(num_cpus: int, timeout_s: float = 120.0, detach_log: Path | None = None,
               resources: dict[str, float] | None = None, joinable: bool = False) -> RayHead:
    """Start a local head for jobs (`ray job submit --address RayHead.dashboard_url`) and drivers
    (`ray.init(address=RayHead.gcs_address)`, with `RayHead.env`'s RAY_AUTH_* in the environment before Ray is
    first imported: Ray reads its auth mode at import). It ends with its starter; with `detach_log` it runs in a
    session of its own until stopped (`patchwatch cluster up`), its output in that file. Jobs without a working
    dir run in the folder it was started from. `resources`: custom Ray resources of the node (`--resources`).
    `joinable` lets other nodes join it (`start_node`): Ray then puts the head on the address that routes off the
    machine, its gRPC servers on all interfaces (token-authenticated), because a joining `ray start` turns
    127.0.0.1 into that address whatever it is given; otherwise the head is on loopback only."""
    import secrets
    import tempfile

    ports = _free_head_ports()
    # jobs run their entrypoints (`audit campaign ...`) with the head's PATH: put this environment's commands on it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           **{name: str(ports[name]) for name in HEAD_PORT_VARIABLES}}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    command = [ray_command(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--num-cpus={num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
               *(f"--{name}={ports[name]}" for name in HEAD_PORTS), *_resources_option(resources)]
    if detach_log:
        log, how = open(detach_log, "w"), {"start_new_session": True, "stdin": subprocess.DEVNULL}
    else:
        log = tempfile.NamedTemporaryFile("w", prefix="ray-head-", suffix=".log", delete=False)
        how = {"preexec_fn": _terminate_with_parent()}
    with log:
        # on loopback for real (see LOOPBACK_NODE_VARIABLE); `env`, which drivers and joining nodes take, goes without
        process = subprocess.Popen(command, env=env if joinable else {**env, LOOPBACK_NODE_VARIABLE: "0"}, stdout=log,
                                   stderr=subprocess.STDOUT, text=True, **how)
    head = RayHead(process, f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['dashboard-port']}", env, ports)
    _wait_for_jobs(head, Path(log.name), timeout_s)
    if joinable:  # drivers must name the address the head's raylet took, or they look for a raylet on 127.0.0.1
        head.gcs_address = f"{_wait_for_head_ip(head, Path(log.name), timeout_s)}:{ports['port']}"
    return head


def _wait_for_head_ip(head: RayHead, log: Path, timeout_s: float) -> str:
    """The address the head's raylet took, once the state API lists the head node: the dashboard answers before
    its node table is filled (a loaded machine showed it empty); stops the head and raises if it is not in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = [node["node_ip"] for node in head.nodes() if node["is_head_node"]]
        if listed:
            return listed[0]
        time.sleep(0.5)
    head.stop()
    raise TimeoutError(f"the Ray head's node was not listed by its state API within {timeout_s:.0f} s (log: {log})")


def _wait_for_jobs(head: RayHead, log: Path, timeout_s: float) -> None:
    """Returns once the dashboard answers and the job agent listens (a job submitted before it has started is
    refused with "No available agent"); stops the head and raises if either does not happen in time."""
    import requests

    agent = ("127.0.0.1", head.ports["dashboard-agent-listen-port"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
        try:
            # any answer will do: with token auth the dashboard says 401 to a request without the token
            if requests.get(f"{head.dashboard_url}/api/version", timeout=2).status_code < 500:
                socket.create_connection(agent, timeout=2).close()
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.5)
    head.stop()
    raise TimeoutError(f"the Ray head's dashboard and job agent did not answer within {timeout_s:.0f} s (log: {log})")


def _resources_option(resources: dict[str, float] | None) -> list[str]:
    import json

    return [f"--resources={json.dumps(resources)}"] if resources else []


#: the ports a node joining a head is given, each chosen free: two nodes on one machine must not meet on Ray's
#: fixed defaults (the dashboard agent's 52365, the metrics export's 8080...)
NODE_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "node-manager-port", "object-manager-port")


@dataclass
class RayNode:
    """A second node joined to a `RayHead` with `ray start --address --block`, on 127.0.0.1 beside it: a cluster of
    two nodes on one machine, for tests and benchmarks of what happens when a node goes. `kill_raylet()` loses the
    node as a crashed machine would; `stop()` ends it and only it."""

    process: subprocess.Popen
    node_id: str  # Ray's hex node id, as `ray.get_runtime_context().get_node_id()` gives it on the node
    ports: dict

    def raylet(self):
        """The node's raylet process (psutil), or None once it has ended."""
        return next((p for p in _process_tree(self.process) if p.name() == "raylet"), None)

    def kill_raylet(self) -> None:
        """SIGKILL the raylet: the head sees the node die (its workers and actors go with it) and reschedules."""
        import psutil

        raylet = self.raylet()
        if raylet is None:
            raise RuntimeError(f"node {self.node_id[:8]} has no raylet running")
        with contextlib.suppress(psutil.NoSuchProcess):
            raylet.kill()

    def runs(self, task: str) -> bool:
        """Whether a worker of this node runs `task` now (a Ray worker's process title names its task)."""
        import psutil

        for process in _process_tree(self.process):
            try:
                if task in process.name() + " ".join(process.cmdline()):
                    return True
            except psutil.Error:  # ended meanwhile
                continue
        return False

    def stop(self, timeout: float = 60.0) -> None:
        _stop_tree(self.process, timeout)


def start_node(head: RayHead, num_cpus: int, resources: dict[str, float] | None = None,
               timeout_s: float = 120.0) -> RayNode:
    """Join a node with `num_cpus` CPUs (and custom `resources`) to `head`, on 127.0.0.1; returns once the head
    lists it alive. It ends with its starter, like `start_head`'s head."""
    import tempfile

    known = {node["node_id"] for node in head.nodes()}
    ports = _distinct_free_ports(list(NODE_PORTS))
    command = [ray_command(), "start", f"--address={head.gcs_address}", "--block", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", "--disable-usage-stats", *(f"--{name}={ports[name]}" for name in NODE_PORTS),
               *_resources_option(resources)]
    log = tempfile.NamedTemporaryFile("w", prefix="ray-node-", suffix=".log", delete=False)
    with log:
        # head.env carries the token and no LOOPBACK_NODE_VARIABLE, which would make `ray start` refuse to join
        process = subprocess.Popen(command, env=head.env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   preexec_fn=_terminate_with_parent())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start (joining {head.gcs_address}) failed: {Path(log.name).read_text()[-2000:]}")
        joined = [n for n in head.nodes() if n["node_id"] not in known and n["state"] == "ALIVE"]
        if joined:
            return RayNode(process, joined[0]["node_id"], ports)
        time.sleep(0.5)
    _stop_tree(process, 30)
    raise TimeoutError(f"the node did not join {head.gcs_address} within {timeout_s:.0f} s (log: {log.name})")


class HeadRecordError(RuntimeError):
    """No head is recorded in a state folder, its record is unreadable, or the recorded head has ended."""


class HeadRecord(BaseModel):
    """What `patchwatch cluster status|down` need to find a detached head again (its token is in TOKEN_FILE)."""

    model_config = ConfigDict(extra="forbid")
    pid: int
    create_time: float  # with the pid, tells the head's `ray start` from a later process that reuses its pid
    gcs_address: str
    dashboard_url: str
    ports: dict[str, int]
    cwd: str  # where jobs submitted without a working dir run
    bin: str  # the environment whose commands are on the jobs' PATH


def record_head(head: RayHead, state_dir: Path) -> HeadRecord:
    """Write HEAD_RECORD and TOKEN_FILE (mode 0600, in a folder of mode 0700) for `recorded_head`."""
    import psutil

    starter = psutil.Process(head.process.pid)
    record = HeadRecord(pid=starter.pid, create_time=starter.create_time(), gcs_address=head.gcs_address,
                        dashboard_url=head.dashboard_url, ports=head.ports, cwd=starter.cwd(),
                        bin=str(Path(sys.executable).parent))
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    _write_private(state_dir / TOKEN_FILE, head.token)
    _write_private(state_dir / HEAD_RECORD, record.model_dump_json(indent=2))
    return record


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there keeps its own mode through os.open
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def recorded_head(state_dir: Path) -> tuple[RayHead, HeadRecord]:
    """The head `record_head` wrote into `state_dir`, while its `ray start` process is still the recorded one;
    raises HeadRecordError, naming the file, otherwise."""
    import psutil
    from pydantic import ValidationError

    path = state_dir / HEAD_RECORD
    if not path.is_file():
        raise HeadRecordError(f"no Ray head recorded: {path} does not exist")
    try:
        record = HeadRecord.model_validate_json(path.read_text())
        token = (state_dir / TOKEN_FILE).read_text().strip()
    except (ValidationError, OSError) as exc:
        raise HeadRecordError(f"the head record {path} is unreadable: {exc}") from exc
    try:
        starter = psutil.Process(record.pid)
        same = round(starter.create_time(), 2) == round(record.create_time, 2) and _running(starter)
    except psutil.NoSuchProcess:
        same = False
    if not same:
        raise HeadRecordError(f"the head recorded in {path} (pid {record.pid}) has ended")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return RayHead(starter, record.gcs_address, record.dashboard_url, env, record.ports), record


def forget_head(state_dir: Path) -> None:
    """Remove a head's record and token (its log stays)."""
    for name in (HEAD_RECORD, TOKEN_FILE):
        (state_dir / name).unlink(missing_ok=True)
