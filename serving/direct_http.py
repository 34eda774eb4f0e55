"""HTTP served by each ingress replica itself, on `ServeConfig.host:direct_port`: the same FastAPI routes, checks and
answers as behind Serve's proxy on `port`, one hop fewer (client -> ingress -> model instead of client -> proxy ->
ingress -> model). `bench/serve_paths.py` measures what that hop costs.

Serve's proxy stays on `port`: it is what spreads clients over ingress replicas on several nodes and what KubeRay's
serve service points at. The direct port is for clients on the ingress replica's node (a camera gateway, the
monitor, a benchmark). Several ingress replicas on one node share it through SO_REUSEPORT, as the gRPC server
does; the kernel spreads connections over them.

The routes find their replica (`self`) through Serve's replica context, which Serve fills only after the replica's
constructor returns; a request that reaches a replica in that moment (a replacement started beside the replica it
replaces, sharing the port) waits for it, up to `STARTING_WAIT_S`, and is answered 503 after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import uvicorn
from ray import serve
from ray.serve.config import HTTPOptions

from serving.protocol import error_body

#: how long a request that reached a replica still starting waits for it before a 503
STARTING_WAIT_S = 5.0
#: how often that wait looks again
STARTING_POLL_S = 0.01
#: connections waiting to be accepted (as Serve's proxy, uvicorn's default)
BACKLOG = 2048


class AfterReplicaStart:
    """ASGI middleware: lets HTTP requests through once Serve has finished starting this replica."""

    def __init__(self, app):
        self.app = app
        self.started = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self.started and not await self._wait_for_start():
            await _send_error(send, 503, f"this ingress replica is still starting; retry within {STARTING_WAIT_S} s")
            return
        await self.app(scope, receive, send)

    async def _wait_for_start(self) -> bool:
        deadline = time.monotonic() + STARTING_WAIT_S
        while serve.get_replica_context().servable_object is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(STARTING_POLL_S)
        self.started = True
        return True


async def _send_error(send, status: int, message: str) -> None:
    body = error_body(message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` that other ingress replicas of this node may bind too (SO_REUSEPORT).
    A port held by another program fails here, in the replica's constructor, with the address in the message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"the direct HTTP port {host}:{port} cannot be bound: {exc}") from exc
    sock.listen(BACKLOG)
    return sock


def start_direct_http_server(app, host: str, port: int) -> uvicorn.Server:
    """Bind `host:port` now and serve `app` (the ingress's FastAPI app) on the running event loop, with the
    keep-alive Serve's proxy uses. Stop it with `server.should_exit = True`."""
    sock = bound_socket(host, port)
    config = uvicorn.Config(AfterReplicaStart(app), lifespan="off", access_log=False, log_config=None,
                            timeout_keep_alive=HTTPOptions().keep_alive_timeout_s)
    server = uvicorn.Server(config)
    # uvicorn takes SIGINT/SIGTERM over when it runs on the main thread; the replica's own handlers must stay
    server.capture_signals = contextlib.nullcontext
    asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    return server
