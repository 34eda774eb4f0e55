"""The Open Inference Protocol's model repository extension (`POST /v2/repository/index`,
`/v2/repository/models/{name}/load|unload`) mapped onto the application's Serve deployments.

Unload scales every version of a model to zero replicas and load scales them back to the ServeConfig's
`num_replicas`, through Serve's external scaling API (the controller's `update_deployment_replicas`, the call the
dashboard's `POST /api/v1/applications/{app}/deployments/{name}/scale` makes; `patchwatch serve` runs without the
dashboard). Scaling rather than deleting: a model's deployment is part of the one `patchwatch` application, and
Serve removes a deployment only by redeploying the whole application, which restarts the ingress that is answering
the unload. Scaled to zero, the deployment (its configuration, the ingress's handle to it) stays and its replicas,
with their engines, CPUs and GPUs, are released. A target count is one value in Serve's controller, so loads and
unloads, even from several ingress replicas, never leave two deployments or half of one; within an ingress replica
they run one at a time per model, so each answers for the state it reached.

Serve refuses its external scaler in an application where a deployment autoscales: there the index works and
load/unload answer 400 saying so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from serving.config import ModelConfig, ServeConfig
from serving.protocol import ProtocolError, shown

logger = logging.getLogger("ray.serve")

READY, UNAVAILABLE = "READY", "UNAVAILABLE"
UNLOADED = "unloaded"
#: how long a load waits for the first replica of each version to answer (an engine loads, a TensorRT plan
#: deserialises, a GPU initialises)
LOAD_TIMEOUT_S = 300.0
#: how often an ingress replica re-reads the models' replica targets from Serve's controller, so loads and unloads
#: made through another ingress replica (or Serve's own scaling API) show up here within this
REFRESH_S = 2.0

Key = tuple[str, str]  # (model name, version)


def external_scaling(config: ServeConfig) -> bool:
    """Whether the application runs with Serve's external scaler, which load/unload use: only when no model
    autoscales (Serve does not take both in one application)."""
    return not any(model.autoscaling for model in config.models)


def parse_request(body: bytes, what: str) -> dict:
    """A repository request's JSON object; an empty body is an empty request (tritonclient sends one)."""
    if not body.strip():
        return {}
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the {what} request is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"the {what} request is nested too deeply") from None
    if not isinstance(request, dict):
        raise ProtocolError(f"the {what} request must be a JSON object, got {shown(request)}")
    return request


def check_load_request(request: dict) -> None:
    """This server loads a model as its ServeConfig describes it: a load that brings its own configuration or
    files (Triton's `config` and `file:` parameters) is refused rather than silently ignored."""
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"'parameters' must be a JSON object, got {shown(parameters)}")
    overrides = sorted(key for key in parameters if key == "config" or key.startswith("file:"))
    if overrides:
        raise ProtocolError(f"load parameters {shown(overrides)} are not supported: models load as the server's "
                            "ServeConfig describes them")


class ModelRepository:
    """One ingress replica's view of which model versions are loaded, and the load/unload operations."""

    def __init__(self, models: dict[Key, tuple[ModelConfig, DeploymentHandle]]):
        self.models = models
        self.unloaded: set[Key] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._changes = 0  # counts loads/unloads begun: a refresh read before one of them is stale
        self._refreshed_at = float("-inf")
        self._refresh_task: asyncio.Task | None = None
        self._controller = None

    # ------------------------------------------------------------------------------------------- state

    def is_loaded(self, model: ModelConfig) -> bool:
        self._refresh_soon()
        return (model.name, model.version) not in self.unloaded

    def check_loaded(self, model: ModelConfig) -> None:
        """Raises the 503 a request for an unloaded model gets."""
        if not self.is_loaded(model):
            raise ProtocolError(f"model {model.name!r} version {model.version!r} is unloaded: POST "
                                f"/v2/repository/models/{model.name}/load to load it", status=503)

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.models})

    def _check_name(self, name: str) -> list[ModelConfig]:
        versions = [model for (n, _), (model, _) in self.models.items() if n == name]
        if not versions:
            raise ProtocolError(f"unknown model {shown(name)} (this server has: {', '.join(self.names())})",
                                status=404)
        return versions

    # ---------------------------------------------------------------------------------- Serve's controller

    async def _get_controller(self):
        if self._controller is None:
            import ray
            from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

            self._controller = await asyncio.to_thread(ray.get_actor, SERVE_CONTROLLER_NAME,
                                                       namespace=SERVE_NAMESPACE)
        return self._controller

    @staticmethod
    def _app_name() -> str:
        from ray import serve

        return serve.get_replica_context().app_name

    async def _deployments(self) -> dict[str, dict]:
        """The application's deployments as Serve's controller reports them: target_num_replicas, replicas,
        status, message."""
        controller = await self._get_controller()
        details = await controller.get_serve_instance_details.remote()
        return details["applications"][self._app_name()]["deployments"]

    async def _scale(self, model: ModelConfig, replicas: int) -> None:
        from ray.serve._private.common import DeploymentID

        controller = await self._get_controller()
        app = self._app_name()
        if not await controller.get_external_scaler_enabled.remote(app):
            raise ProtocolError(
                f"Serve application {app!r} runs without Serve's external scaler, so models cannot be loaded or "
                "unloaded: `patchwatch serve` enables it when no model autoscales; with `serve deploy`, set "
                "external_scaler_enabled: true on the application (and no autoscaling)")
        await controller.update_deployment_replicas.remote(DeploymentID(name=model.deployment_name, app_name=app),
                                                           replicas)

    def _refresh_soon(self) -> None:
        """Starts a background re-read of the replica targets when the last is older than REFRESH_S (a request
        never waits for it)."""
        if time.monotonic() - self._refreshed_at < REFRESH_S or (self._refresh_task and not self._refresh_task.done()):
            return
        self._refreshed_at = time.monotonic()
        try:
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())
        except RuntimeError:  # no event loop (a synchronous caller): the next request refreshes
            self._refreshed_at = float("-inf")

    async def _refresh(self) -> None:
        changes = self._changes
        try:
            self._apply(await self._deployments(), changes)
        except Exception as exc:  # the view stays as it was; the next refresh tries again
            logger.warning("model repository: could not read Serve's deployments: %s", exc)

    def _apply(self, deployments: dict[str, dict], changes: int) -> None:
        """Takes the targets read from the controller as this replica's view, unless a load or unload began
        since they were read (or runs now): that one's own outcome is newer."""
        self._refreshed_at = time.monotonic()
        if changes != self._changes:
            return
        busy = {name for name, lock in self._locks.items() if lock.locked()}
        for key, (model, _) in self.models.items():
            found = deployments.get(model.deployment_name)
            if found is None or model.name in busy:
                continue
            if found["target_num_replicas"] == 0:
                self.unloaded.add(key)
            else:
                self.unloaded.discard(key)

    # -------------------------------------------------------------------------------------- operations

    async def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model version: READY, or UNAVAILABLE with the reason (unloaded, starting, Serve's message)."""
        changes = self._changes
        try:
            deployments = await self._deployments()
        except Exception as exc:
            raise ProtocolError(f"Serve's controller did not report the deployments: {exc}", status=503) from None
        self._apply(deployments, changes)
        entries = []
        for (name, version), (model, _) in sorted(self.models.items()):
            state, reason = _state(deployments.get(model.deployment_name), (name, version) in self.unloaded)
            if state == READY or not ready_only:
                entries.append({"name": name, "version": version, "state": state, "reason": reason})
        return entries

    async def unload(self, name: str) -> None:
        """Every version of `name` to zero replicas; requests for it are refused from now on (replicas finish
        the calls they hold as Serve stops them)."""
        versions = self._check_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            self._changes += 1
            keys = {(model.name, model.version) for model in versions}
            was_unloaded = keys & self.unloaded
            self.unloaded |= keys
            try:
                for model in versions:
                    await self._scale(model, 0)
            except BaseException:
                self.unloaded = (self.unloaded - keys) | was_unloaded
                raise
            logger.info("model repository: unloaded %s", name)

    async def load(self, name: str) -> None:
        """Every version of `name` back to its configured replicas; returns once each version answers."""
        versions = self._check_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            self._changes += 1
            for model in versions:
                await self._scale(model, model.num_replicas)  # refused where models autoscale (see _scale)
            for model in versions:
                handle = self.models[(model.name, model.version)][1]
                try:
                    await asyncio.wait_for(handle.ready.remote(), timeout=LOAD_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise ProtocolError(f"model {name!r} version {model.version!r} did not start within "
                                        f"{LOAD_TIMEOUT_S:.0f} s (Serve keeps trying: see /v2/repository/index)",
                                        status=503) from None
                self.unloaded.discard((model.name, model.version))
            logger.info("model repository: loaded %s", name)


def _state(deployment: dict[str, Any] | None, unloaded: bool) -> tuple[str, str]:
    if unloaded or (deployment is not None and deployment["target_num_replicas"] == 0):
        return UNAVAILABLE, UNLOADED
    if deployment is None:
        return UNAVAILABLE, "no such deployment in Serve's application"
    running = sum(replica.get("state") == "RUNNING" for replica in deployment.get("replicas", []))
    if running:
        return READY, ""
    message = deployment.get("message") or f"status {deployment.get('status')}"
    return UNAVAILABLE, f"starting: no replica running yet ({message})"
