"""What `patchwatch serve` exposes, as a user runs it: every socket that the command and the Ray node it starts
listen on (measured with psutil), on `--host 127.0.0.1` and `--host 0.0.0.0`; the node's metrics export
(`ray_patchwatch_*`) reachable on loopback and not on any other address of this machine; what answers HTTP that
never parses, and what Serve's proxy answers itself. And the sockets of a `patchwatch cluster up` head."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import psutil
import pytest
import requests

from serving.client import OipClient
from serving.cluster import free_port, start_head

pytestmark = [pytest.mark.slow, pytest.mark.data]

PATCHWATCH = [sys.executable, "-m", "patchwatch.cli"]
KEY_VARIABLE = "PATCHWATCH_EXPOSURE_KEY"
#: what uvicorn (httptools), inside Serve's proxy, writes for a request it cannot parse; nothing of patchwatch runs
UVICORN_PARSE_ERROR = "Invalid HTTP request received."
#: Serve's replicas, whose inter-deployment gRPC server listens on every interface, and one of its methods
REPLICA_PROCESS, REPLICA_GRPC_METHOD = "ray::ServeReplica", "/ray.serve.ASGIService/HandleRequest"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket bound to loopback
    return (mapped or address).is_loopback


def _outside_addresses() -> list[str]:
    """This machine's addresses other than loopback (and IPv6 link-local, which needs a scope to connect)."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(entry.address.split("%")[0])
                if not ip.is_loopback and not ip.is_link_local:
                    found.append(str(ip))
    return found


def _listeners(root: psutil.Process) -> list[tuple[str, int, str]]:
    """(address, port, process name) for every listening TCP socket of `root` and its descendants."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        except psutil.Error:  # ended meanwhile
            continue
    return sorted(found, key=lambda row: row[1])


def _connects(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(5)
        try:
            sock.connect((ip, port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def patchwatch_serve(engine, host: str, log_path):
    """`patchwatch serve` on `host` with an API key, ready, until the block ends (SIGTERM, as a supervisor)."""
    port, metrics_port = free_port(), free_port()
    key = "k-" + os.urandom(8).hex()
    log = open(log_path, "w")
    process = subprocess.Popen(
        [*PATCHWATCH, "serve", f"camvid={engine}", "--host", host, "--port", str(port),
         "--metrics-port", str(metrics_port), "--api-key-env", KEY_VARIABLE, "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=log, text=True, env={**os.environ, KEY_VARIABLE: key})
    try:
        deadline = time.monotonic() + 300
        while "\nready; " not in log_path.read_text():  # printed after its URLs, however it can be stopped
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "patchwatch serve never became ready"
            time.sleep(1)
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "metrics_port": metrics_port, "key": key,
               "pid": process.pid, "log": log_path}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def served(camvid_unet_engines, tmp_path_factory):
    with patchwatch_serve(camvid_unet_engines["1"], "127.0.0.1",
                          tmp_path_factory.mktemp("exposure") / "serve.err") as service:
        yield service


def test_every_socket_of_the_service_and_its_ray_node_is_on_loopback(served):
    listeners = _listeners(psutil.Process(served["pid"]))
    table = "\n".join(f"{ip}:{port} {name}" for ip, port, name in listeners)
    ports = {port for _, port, _ in listeners}
    assert served["port"] in ports and served["metrics_port"] in ports, table
    # the Ray node took loopback: GCS, raylet, object manager, workers and actors, the agents, the metrics export
    assert {"gcs_server", "raylet"} <= {name for _, _, name in listeners}, table
    exposed = [(ip, port, name) for ip, port, name in listeners if not _is_loopback(ip)]
    # but for the one Ray gives no address to: each Serve replica's inter-deployment gRPC server, bound to
    # "[::]:0" in Ray Serve's replica.py, behind Ray's token (see the next test)
    assert exposed and all(name.startswith(REPLICA_PROCESS) for _, _, name in exposed), f"off loopback:\n{table}"
    assert "WARNING" not in served["log"].read_text()


def test_node_metrics_answer_on_loopback_only(served):
    client = OipClient(served["url"], api_key=served["key"])
    client.infer("camvid", {"frames": np.zeros((1, 32, 32, 3), np.uint8)}, {"labels": True})
    metrics_url = f"http://127.0.0.1:{served['metrics_port']}/metrics"
    deadline = time.monotonic() + 120  # Ray's agent exports what replicas recorded every few seconds
    while "ray_patchwatch_requests_total" not in requests.get(metrics_url, timeout=10).text:
        assert time.monotonic() < deadline, "the node's metrics export never showed ray_patchwatch_requests_total"
        time.sleep(2)
    outside = _outside_addresses()
    if not outside:
        pytest.skip("this machine has no address but loopback: nothing to reach the metrics export from")
    # nothing of the service or its node answers on the machine's other addresses, the metrics export first;
    # the replicas' gRPC servers, which do, refuse a call without Ray's token
    for ip in outside:
        assert not _connects(ip, served["metrics_port"]), f"the metrics export answers on {ip}"
        for listen_ip, port, name in _listeners(psutil.Process(served["pid"])):
            if _is_loopback(listen_ip):
                assert not _connects(ip, port), f"{name} answers on {ip}:{port}"
            else:
                assert _grpc_refusal(ip, port) == grpc.StatusCode.UNAUTHENTICATED, f"{name} on {ip}:{port}"


def _grpc_refusal(ip: str, port: int):
    """The status a Serve replica's gRPC server answers to a request that carries no token."""
    host = f"[{ip}]" if ":" in ip else ip
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(REPLICA_GRPC_METHOD)
        try:
            call(b"", timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends `request` as it is and reads until the server closes: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


MALFORMED = {
    "garbage request line": b"\x16\x03\x01 not http at all\r\n\r\n",
    "header without a colon": b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "Content-Length not a number": b"POST /v2/models/camvid/infer HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
    "two different Content-Lengths": (b"POST /v2/models/camvid/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                      b"Content-Length: 3\r\n\r\n{}"),
    "bad chunk size": (b"POST /v2/models/camvid/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\n{}\r\n0\r\n\r\n"),
}


@pytest.mark.parametrize("request_bytes", list(MALFORMED.values()), ids=list(MALFORMED))
def test_unparseable_http_is_answered_by_servers_proxy_in_plain_text(served, request_bytes):
    """Such a request never reaches the application: uvicorn, which Serve's proxy builds with fixed options (no
    protocol class, no error body), answers 400 in text/plain and closes. The service answers the next request."""
    status, headers, body = _raw_exchange(served["port"], request_bytes)
    assert status == 400
    assert headers["content-type"].startswith("text/plain") and headers["connection"] == "close"
    assert body.decode() == UVICORN_PARSE_ERROR
    assert requests.get(f"{served['url']}/v2/health/live", timeout=30).status_code == 200



def test_servers_proxy_answers_its_own_routes_and_timeout_header_before_the_application(served):
    """What Serve's proxy answers itself, without the API key and in its own format (see the README)."""
    health = requests.get(f"{served['url']}/-/healthz", timeout=30)
    assert health.status_code == 200 and health.text == "success"
    assert requests.get(f"{served['url']}/-/routes", timeout=30).json() == {"/": "patchwatch"}
    timed_out = requests.get(f"{served['url']}/v2", headers={"x-request-timeout-seconds": "0.000001"}, timeout=30)
    assert timed_out.status_code == 408 and timed_out.headers["content-type"].startswith("text/plain")
    assert "timed out" in timed_out.text

def test_a_service_on_every_interface_keeps_its_ray_node_on_loopback(camvid_unet_engines, tmp_path):
    """Only Serve's proxy (behind the API key) and the replicas' gRPC servers (behind Ray's token) are off
    loopback; the node's metrics export, which asks for nothing, stays on it (the service's `GET /metrics`, behind
    the key, serves those families)."""
    with patchwatch_serve(camvid_unet_engines["1"], "0.0.0.0", tmp_path / "serve.err") as service:
        listeners = _listeners(psutil.Process(service["pid"]))
        table = "\n".join(f"{ip}:{port} {name}" for ip, port, name in listeners)
        off_loopback = {(ip, port) for ip, port, name in listeners
                        if not _is_loopback(ip) and not name.startswith(REPLICA_PROCESS)}
        assert off_loopback == {("0.0.0.0", service["port"])}, table
        assert ("127.0.0.1", service["metrics_port"]) in {(ip, port) for ip, port, _ in listeners}, table
        for ip in _outside_addresses():
            assert not _connects(ip, service["metrics_port"]), f"the metrics export answers on {ip}"
            if ":" not in ip:  # the proxy's socket is IPv4
                bare = requests.get(f"http://{ip}:{service['port']}/v2", timeout=30)
                assert bare.status_code == 401


def test_a_cluster_up_head_listens_on_loopback_only():
    """`start_head` (what `patchwatch cluster up` runs): every port it names, and any other, on loopback."""
    head = start_head(num_cpus=1)
    try:
        listeners = head.listeners()
    finally:
        head.stop()
    table = "\n".join(f"{ip}:{port} {what}" for ip, port, what in listeners)
    named = {what for _, _, what in listeners}
    assert {"GCS", "raylet", "object manager", "metrics", "dashboard", "Ray client server"} <= named, table
    assert all(_is_loopback(ip) for ip, _, _ in listeners), table
