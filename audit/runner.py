"""A campaign as a Ray job: trials run as Ray tasks over the cluster's CPUs/GPUs; the driver stores each
finished trial at once (one writer, one transaction per trial), so a killed worker costs a retried task and a
killed job costs only its trials in flight: resubmitted, it skips every stored trial and runs the rest.

Each task runs on the device Ray gave it (`segmenters.device.assigned_device`: `auto` takes the task's GPU when
it has one); several tasks share a GPU through fractional `num_gpus`. Before any work starts, the driver refuses
a device request the tasks cannot meet (`check_device_request`, `check_cluster_gpus`).

Inside `ray job submit`, `ray.init()` joins the job's cluster; run directly, it starts a local one.

Before the trials, the driver runs the one-class check (`segmenters.twin.TwinHealth`) on each twin over the first
campaign images: a twin that predicts one class everywhere would make every trial meaningless, so it is named in a
WARNING line, in the summary and in `twin_health.json` (the campaign still runs)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from audit.campaign import CampaignConfig, Trial, expand, load_campaign
from audit.store import TrialStore
from segmenters.device import DeviceError, device_name, resolve_device
from segmenters.files import atomic_write_text

#: how long a driver that joined a cluster waits for a node with the GPUs one task needs (autoscaling)
GPU_WAIT_S = 300.0
#: how often it looks
GPU_POLL_S = 2.0
#: how many of the attacked images the driver runs each twin on for the one-class check
HEALTH_CHECK_IMAGES = 8
#: the resource Ray gives the head node alone
HEAD_RESOURCE = "node:__internal_head__"


def run_campaign(config_path: str | Path, out: str | Path, *, address: str | None = None, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, max_retries: int = 3, local_cpus: int | None = None,
                 progress: bool = True, device: str | None = None, gpu_wait_s: float | None = None) -> dict:
    """Run the campaign's pending trials; `device` (auto|cpu|cuda|cuda:N) overrides the file's `device`."""
    config = load_campaign(config_path)
    if device is not None:
        config = config.model_copy(update={"device": device_name(device)})
    check_device_request(config.device, num_gpus, local=starts_local_cluster(address))
    trials = expand(config)
    with TrialStore(out) as store:
        store.save_campaign(Path(config_path).read_text(), config.model_dump_json())
        done = store.done_ids()
        pending = [t for t in trials if t.id not in done]
        summary = {"campaign": config.name, "trials": len(trials), "already_stored": len(trials) - len(pending),
                   "stored": 0, "failed": 0, "out": str(out), "device": config.device,
                   "twin_health": check_twins(config, trials)}
        atomic_write_text(store.root / "twin_health.json", json.dumps(summary["twin_health"], indent=2))

        def stored(trial, result) -> None:
            store.record(trial.as_dict(), result["metrics"], result["artefacts"], result["replay"],
                         result["worker"], result["seconds"], node=result.get("node"))

        def failed(trial, error: str) -> None:
            store.record_failure(trial.as_dict(), error)

        campaign_json = config.model_dump_json()
        counts = run_tasks(_run_trial, [(campaign_json, trial) for trial in pending], pending, stored, failed,
                           total=len(trials), done=summary["already_stored"], label=f"campaign {config.name}",
                           address=address, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                           local_cpus=local_cpus, progress=progress, device=config.device, gpu_wait_s=gpu_wait_s)
        summary["nodes"] = store.trials_by_node()
    return {**summary, **counts}


def check_twins(config: CampaignConfig, trials: list[Trial]) -> dict[str, dict]:
    """Each twin's one-class check (`TwinHealth.as_dict()`) over the first `HEALTH_CHECK_IMAGES` images the trials
    attack, on the driver's CPU, with a WARNING line for each twin that predicts one class for (nearly)
    everything. Never fails the campaign: a twin that cannot be read here is left to its trials to report."""
    from segmenters.twin import load_twin, twin_health, warn_if_one_class

    indices = sorted({trial.image_index for trial in trials})[:HEALTH_CHECK_IMAGES]
    if not indices:
        return {}
    data = config.images.build()
    images = [data[index][0][None] for index in indices]  # one at a time: a folder's photos differ in size
    report = {}
    for model in config.models:
        try:
            twin = load_twin(model)
        except (FileNotFoundError, ValueError):
            continue
        health = twin_health(twin, images)
        warn_if_one_class(health, f"campaign {config.name}, twin {model}")
        report[model] = health.as_dict()
    return report


def starts_local_cluster(address: str | None) -> bool:
    """Whether `run_tasks` will start a Ray cluster of its own on this machine (no address, no $RAY_ADDRESS,
    Ray not yet initialised): then the tasks run here, and this machine's devices are theirs."""
    import ray

    return not (ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"))


def check_device_request(device: str, num_gpus: float, *, local: bool) -> None:
    """Refuse, before any work starts, a device the tasks cannot have (`DeviceError` naming it): CUDA for
    tasks on this machine when it has none; CUDA while tasks get no GPU (`num_gpus` 0); GPU N of a task
    given fewer than N + 1."""
    requested = torch.device(device_name(device)) if device != "auto" else None
    if requested is None or requested.type != "cuda":
        return
    if local:
        resolve_device(device)
    if num_gpus <= 0:
        raise DeviceError(f"device {device!r} was asked for, but each task gets no GPU (gpus per trial 0): "
                          "give each one a GPU (--gpus-per-trial 1) or a share of one (e.g. 0.25)")
    given = math.ceil(num_gpus)
    if requested.index is not None and requested.index >= given:
        raise DeviceError(f"device {device!r} was asked for, but each task gets {given} GPU(s) "
                          f"(gpus per trial {num_gpus}), seen in the task as cuda:0..cuda:{given - 1}")


def check_cluster_gpus(device: str, num_gpus: float, wait_s: float) -> None:
    """With Ray initialised: refuse a GPU share no node of the cluster can give one task (its tasks would wait
    for ever), naming the device. A joined cluster may still be adding a GPU node (a KubeRay worker group
    scaled from zero): the autoscaler is asked for one task's share and given `wait_s` to provide it."""
    import ray
    from ray.autoscaler.sdk import request_resources

    if num_gpus <= 0:
        return
    deadline = time.monotonic() + wait_s
    if wait_s > 0:
        request_resources(bundles=[{"GPU": num_gpus}])
    try:
        while (largest := _largest_gpu_node()) < num_gpus:
            if time.monotonic() >= deadline:
                total = ray.cluster_resources().get("GPU", 0)
                raise DeviceError(
                    f"device {device!r} with {num_gpus:g} GPU(s) per task: the Ray cluster has {total:g} GPU(s), "
                    f"at most {largest:g} on one node{f' after {wait_s:g} s' if wait_s > 0 else ''}, so no task "
                    "could ever start (--gpus-per-trial 0 runs on CPUs)")
            time.sleep(GPU_POLL_S)
    finally:
        if wait_s > 0:
            request_resources(bundles=[])


def _largest_gpu_node() -> float:
    import ray

    return max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)


def run_tasks(function, arguments: list[tuple], items: list, on_result, on_failure, *, total: int, done: int,
              label: str, address: str | None, num_cpus: float, num_gpus: float, max_retries: int,
              local_cpus: int | None, progress: bool, device: str = "auto",
              gpu_wait_s: float | None = None) -> dict:
    """Run `function(*arguments[i], device, threads)` as Ray tasks and hand each finished one to the driver's
    `on_result(items[i], result)` (or `on_failure(items[i], error)`) as it lands: the one writer that makes
    every result durable before the next is awaited. Joins $RAY_ADDRESS / `address`, or starts a local cluster
    and stops it after. Refuses a GPU share the cluster cannot give before submitting anything (a joined
    cluster gets `gpu_wait_s`, default `GPU_WAIT_S`, to provide it; a local one cannot change)."""
    import ray
    from tqdm import tqdm

    counts = {"stored": 0, "failed": 0}
    if not items:
        return counts
    started_ray = False
    local = starts_local_cluster(address)
    if local:
        # "local": a cluster of our own, never one that `ray start` left on this machine
        ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)
        started_ray = True
    elif not ray.is_initialized():
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=False)
        started_ray = True
    task = ray.remote(function).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                        retry_exceptions=False)
    threads = max(1, int(num_cpus))
    try:
        check_cluster_gpus(device, num_gpus, wait_s=0.0 if local else gpu_wait_s if gpu_wait_s is not None
                           else GPU_WAIT_S)
        in_flight = {task.remote(*args, device, threads): item for args, item in zip(arguments, items)}
        with tqdm(total=total, initial=done, desc=label, disable=not progress) as bar:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                item = in_flight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as exc:  # the task itself failed (or its worker died max_retries times)
                    on_failure(item, f"{type(exc).__name__}: {exc}")
                    counts["failed"] += 1
                else:
                    on_result(item, result)
                    counts["stored"] += 1
                bar.update(1)
                bar.set_postfix(stored=counts["stored"], failed=counts["failed"])
    finally:
        if started_ray:
            ray.shutdown()
    return counts


def task_device(device: str, threads: int) -> torch.device:
    """Inside a Ray task: the task's CPU threads, and the device Ray gave it for `device`."""
    import ray

    from segmenters.device import assigned_device

    torch.set_num_threads(threads)  # the task's CPUs, not the whole machine's
    return assigned_device(device, ray.get_gpu_ids())


def task_node() -> str:
    """Inside a Ray task: the node it runs on, as `head|worker ADDRESS ID8` (the node id's first 8 hex digits tell
    apart two nodes of one machine, which share an address)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), {})
    role = "head" if HEAD_RESOURCE in node.get("Resources", {}) else "worker"
    return f"{role} {node.get('NodeManagerAddress', '?')} {node_id[:8]}"


def _run_trial(campaign_json: str, trial, device: str, threads: int) -> dict:
    from audit.trial import execute_trial

    return {**execute_trial(campaign_json, trial, task_device(device, threads)), "node": task_node()}
