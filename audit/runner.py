"""A campaign as a Ray job: trials run as Ray tasks over the cluster's CPUs/GPUs; the driver stores each
finished trial at once (one writer, one transaction per trial), so a killed worker costs a retried task and a
killed job costs only its trials in flight: resubmitted, it skips every stored trial and runs the rest.

Inside `ray job submit`, `ray.init()` joins the job's cluster; run directly, it starts a local one."""

from __future__ import annotations

import os
from pathlib import Path

from audit.campaign import expand, load_campaign
from audit.store import TrialStore


def run_campaign(config_path: str | Path, out: str | Path, *, address: str | None = None, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, max_retries: int = 3, local_cpus: int | None = None,
                 progress: bool = True) -> dict:
    config = load_campaign(config_path)
    trials = expand(config)
    with TrialStore(out) as store:
        store.save_campaign(Path(config_path).read_text(), config.model_dump_json())
        done = store.done_ids()
        pending = [t for t in trials if t.id not in done]
        summary = {"campaign": config.name, "trials": len(trials), "already_stored": len(trials) - len(pending),
                   "stored": 0, "failed": 0, "out": str(out)}

        def stored(trial, result) -> None:
            store.record(trial.as_dict(), result["metrics"], result["artefacts"], result["replay"],
                         result["worker"], result["seconds"])

        def failed(trial, error: str) -> None:
            store.record_failure(trial.as_dict(), error)

        campaign_json = config.model_dump_json()
        counts = run_tasks(_run_trial, [(campaign_json, trial) for trial in pending], pending, stored, failed,
                           total=len(trials), done=summary["already_stored"], label=f"campaign {config.name}",
                           address=address, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                           local_cpus=local_cpus, progress=progress)
    return {**summary, **counts}


def run_tasks(function, arguments: list[tuple], items: list, on_result, on_failure, *, total: int, done: int,
              label: str, address: str | None, num_cpus: float, num_gpus: float, max_retries: int,
              local_cpus: int | None, progress: bool) -> dict:
    """Run `function(*arguments[i], threads)` as Ray tasks and hand each finished one to the driver's
    `on_result(items[i], result)` (or `on_failure(items[i], error)`) as it lands: the one writer that makes
    every result durable before the next is awaited. Joins $RAY_ADDRESS / `address`, or starts a local cluster
    and stops it after."""
    import ray
    from tqdm import tqdm

    counts = {"stored": 0, "failed": 0}
    if not items:
        return counts
    started_ray = False
    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            # "local": a cluster of our own, never one that `ray start` left on this machine
            ray.init(address="local", num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)
        started_ray = True
    task = ray.remote(function).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                        retry_exceptions=False)
    threads = max(1, int(num_cpus))
    try:
        in_flight = {task.remote(*args, threads): item for args, item in zip(arguments, items)}
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


def _run_trial(campaign_json: str, trial, threads: int) -> dict:
    import torch

    from audit.trial import execute_trial

    torch.set_num_threads(threads)  # the task's CPUs, not the whole machine's
    return execute_trial(campaign_json, trial)
