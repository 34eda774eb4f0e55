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
    import ray
    from tqdm import tqdm

    config = load_campaign(config_path)
    trials = expand(config)
    store = TrialStore(out)
    store.save_campaign(Path(config_path).read_text())
    done = store.done_ids()
    pending = [t for t in trials if t.id not in done]
    summary = {"campaign": config.name, "trials": len(trials), "already_stored": len(trials) - len(pending),
               "stored": 0, "failed": 0, "out": str(out)}
    if not pending:
        store.close()
        return summary

    started_ray = False
    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            ray.init(num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)
        started_ray = True
    task = ray.remote(_run_trial).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                          retry_exceptions=False)
    campaign_json = config.model_dump_json()
    threads = max(1, int(num_cpus))
    try:
        in_flight = {task.remote(campaign_json, trial, threads): trial for trial in pending}
        with tqdm(total=len(trials), initial=summary["already_stored"], desc=f"campaign {config.name}",
                  disable=not progress) as bar:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                trial = in_flight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as exc:  # the trial itself failed (or its worker died max_retries times)
                    store.record_failure(trial.as_dict(), f"{type(exc).__name__}: {exc}")
                    summary["failed"] += 1
                else:
                    store.record(trial.as_dict(), result["metrics"], result["artefacts"], result["replay"],
                                 result["worker"], result["seconds"])
                    summary["stored"] += 1
                bar.update(1)
                bar.set_postfix(stored=summary["stored"], failed=summary["failed"])
    finally:
        store.close()
        if started_ray:
            ray.shutdown()
    return summary


def _run_trial(campaign_json: str, trial, threads: int) -> dict:
    import torch

    from audit.trial import execute_trial

    torch.set_num_threads(threads)  # the task's CPUs, not the whole machine's
    return execute_trial(campaign_json, trial)
