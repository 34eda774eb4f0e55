"""`patchwatch monitor`: camera streams through a served (or local) engine, flips caught, events out, a live page."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click

from patchwatch.options import device_option, resolved_device

#: how alarms can be confirmed on the engine's twin (`--confirm`)
CONFIRMERS = ("vgatt",)
#: the frame at which a `trial:` source's patch appears when the source does not say (`@ONSET`)
TRIAL_ONSET = 15
#: how often `--keep-page` looks whether it was asked to stop (SIGTERM) while the page stays up
KEEP_PAGE_POLL_S = 0.2


def build_engine(engine_path: str | None, url: str | None, model: str | None, version: str | None,
                 handle: str | None, api_key_env: str | None = None):
    """The monitor's one `Engine`: an engine file, the OIP endpoint (from outside the cluster), or a Serve
    deployment handle NAME:VERSION (from inside it, e.g. as a Ray job)."""
    import os

    chosen = [bool(engine_path), bool(url), bool(handle)]
    if sum(chosen) != 1:
        raise click.UsageError("give one engine: --engine FILE, --url URL --model NAME, or --handle NAME:VERSION")
    if engine_path:
        from export import load_engine

        return load_engine(engine_path)
    if url:
        from serving.client import RemoteEngine

        if not model:
            raise click.UsageError("--url needs --model NAME")
        return RemoteEngine(url, model, version, api_key=os.environ.get(api_key_env) if api_key_env else None)
    import ray

    from serving.model import ServeHandleEngine

    name, _, handle_version = handle.partition(":")
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), configure_logging=False, log_to_driver=False)
    return ServeHandleEngine(name, handle_version or "1")


def build_confirmer(method: str | None, twin: str | None, device: str):
    """The callable that confirms each alarm (`--confirm vgatt`: VGatt on the engine's twin `--twin`, on
    `device`, resolved here before any stream opens), or None without `--confirm`."""
    if method is None:
        if twin:
            raise click.UsageError("--twin is the checkpoint alarms are confirmed on: give --confirm vgatt with it")
        return None
    if not twin:
        raise click.UsageError(f"--confirm {method} needs --twin CHECKPOINT (the engine's twin)")
    from audit.confirm import VGattConfirmer
    from segmenters.twin import load_twin

    return VGattConfirmer(load_twin(twin, map_location=resolved_device(device)))


def trial_source(text: str, fps: float | None, frames: int | None):
    """`trial:RUN_DIR:TRIAL_ID[@ONSET]`: a synthetic camera over a stored shapes campaign trial's scene, its
    patch appearing at frame ONSET (default `TRIAL_ONSET`). The run is read through `audit.store`."""
    from audit.store import trial_scene
    from monitor.cameras import trial_camera

    body, _, onset = text[len("trial:"):].partition("@")
    run, _, trial = body.rpartition(":")
    if not run or not trial or (onset and not onset.isdigit()):
        raise ValueError(f"trial source is trial:RUN_DIR:TRIAL_ID[@ONSET], got {text!r}")
    return trial_camera(trial_scene(run, trial), int(onset or TRIAL_ONSET), frames=frames, fps=fps)


def open_stream_source(text: str, fps: float | None, frames: int | None):
    """A SOURCES argument as a frame source; click.BadParameter naming what is wrong with it."""
    from monitor.streams import OpenCVSource, open_source

    try:
        source = trial_source(text, fps, frames) if text.startswith("trial:") else open_source(text, fps, frames)
    except (ValueError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint="SOURCES") from exc
    if isinstance(source, OpenCVSource) and source.finite and not Path(source.target).is_file():
        raise click.BadParameter(f"no video file at {source.target}", param_hint="SOURCES")
    return source


def monitored_stream(name: str, source, policy: str, fps: float | None, every_frame: bool):
    """`source` as a `Stream`. A finite source (a file, a synthetic clip with --frames) is opened once (a file
    that does not open will not open later); with `every_frame` it is read with back-pressure ("block"), every
    frame reaching the engine; otherwise a file plays at `fps` or its own rate, as its camera delivered it. Live
    sources keep `policy` and their own pace."""
    from monitor.streams import Backoff, Stream

    backoff = Backoff(attempts=1) if source.finite else Backoff()
    if every_frame and source.finite:
        return Stream(source, name=name, policy="block", backoff=backoff)
    recorded = source.playback_fps()  # None: a live or synthetic source, which paces itself
    pace = None if recorded is None else fps or recorded
    if pace is not None:
        click.echo(f"{name}: played at {pace:g} frames/s, as a camera delivers (--fps sets the rate; --every-frame "
                   "reads every frame as fast as the engine goes)", err=True)
    return Stream(source, name=name, policy=policy, backoff=backoff, pace=pace)


def run_until_stopped(watcher, duration: float | None, stopped: threading.Event) -> dict:
    """The run's summary, once every source ended, `duration` passed, or a stop was asked for (Ctrl-C or
    SIGTERM, which also set `stopped`)."""
    signal.signal(signal.SIGTERM, lambda *_: (stopped.set(), watcher.stop()))
    try:
        return watcher.run(duration=duration)
    except KeyboardInterrupt:
        stopped.set()
        watcher.stop()
        return watcher.summary()


def serve_until_stopped(url: str, stopped: threading.Event) -> None:
    """`--keep-page`: the run ended; the page stays up until Ctrl-C (SIGINT) or SIGTERM (which sets `stopped`)."""
    click.echo(f"run ended; the live page stays up at {url} (--keep-page): Ctrl-C or SIGTERM stops it", err=True)
    try:
        while not stopped.wait(KEEP_PAGE_POLL_S):
            pass
    except KeyboardInterrupt:
        pass


def counterfactual_engine(path: str | None, served: bool):
    """The local engine the detectors' counterfactuals run on (`--counterfactual-engine`), or None: then they run
    on the monitored engine, which costs a served one a call each (said on stderr)."""
    if path is None:
        if served:
            click.echo("note: the detectors' counterfactuals will each cost the served engine a call (on a moving "
                       "camera they take ~40 % of its frames/s); --counterfactual-engine FILE runs them on a local "
                       "copy", err=True)
        return None
    from export import load_engine

    return load_engine(path, device="cpu", threads=1)


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--engine", "engine_path", type=click.Path(exists=True, dir_okay=False), help="a local engine file")
@click.option("--url", help="an OIP endpoint, e.g. http://127.0.0.1:8000 (with --model)")
@click.option("--model", help="served model name")
@click.option("--version", help="served model version (default: the latest)")
@click.option("--handle", help="Serve deployment handle NAME:VERSION (run inside the cluster)")
@click.option("--counterfactual-engine", "counterfactual_path", type=click.Path(exists=True, dir_okay=False),
              help="a local copy of the served model's engine file: the detectors' counterfactuals run on it (one "
                   "thread, the monitor's own core) instead of costing the served engine a call each")
@click.option("--api-key-env", help="environment variable with the service's API key")
@click.option("--events", default="runs/monitor/events.jsonl", show_default=True, help="JSON-lines event log")
@click.option("--webhook", help="POST every event as JSON here")
@click.option("--page-port", type=int, default=8090, show_default=True, help="live page port on 127.0.0.1 (0: any)")
@click.option("--no-page", is_flag=True, help="no live page")
@click.option("--keep-page", is_flag=True,
              help="keep the live page up after the run ends, until Ctrl-C or SIGTERM (a stop during the run ends "
                   "both)")
@click.option("--policy", type=click.Choice(["latest", "drop_oldest", "block"]), default="latest", show_default=True,
              help="overload policy: keep only the newest frame, a short queue, or make the source wait")
@click.option("--every-frame", is_flag=True,
              help="files and synthetic clips with --frames: every frame to the engine, in order, none dropped, read "
                   "as fast as the engine takes them (back-pressure) instead of at their frame rate; --policy then "
                   "applies to live sources only")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True),
              help="the rate file and synthetic sources are played at [default: a video's own rate; 25 for images and "
                   "a video that reports none (monitor.streams.DEFAULT_FILE_FPS); synthetic sources as fast as they "
                   "render]")
@click.option("--frames", type=int, help="stop synthetic sources after this many frames")
@click.option("--duration", type=float, help="stop after this many seconds (default: when every source ended)")
@click.option("--confirm", type=click.Choice(CONFIRMERS),
              help="confirm each alarm on the engine's twin (--twin): vgatt adds VGatt evidence to the alarm")
@click.option("--twin", type=click.Path(exists=True, dir_okay=False),
              help="the engine's twin checkpoint, for --confirm")
@device_option("the twin of --confirm runs")
def monitor(sources, engine_path, url, model, version, handle, counterfactual_path, api_key_env, events, webhook,
            page_port, no_page, keep_page, policy, every_frame, fps, frames, duration, confirm, twin, device) -> None:
    """Watch SOURCES (video files, image folders or globs, rtsp/http URLs, camera indices, synthetic:INDEX,
    trial:RUN:TRIAL[@ONSET]) for patch-induced class flips. A file plays at its own frame rate, as a live camera
    would deliver it (frames the engine has no time for are dropped by --policy); --every-frame processes every
    frame instead. Alarms and stream events go to --events (and --webhook); the page shows every stream live with
    its labels and the alarm list."""
    from monitor.pipeline import JsonLinesSink, Monitor, WebhookSink

    if every_frame and fps is not None:
        raise click.UsageError("--every-frame reads files as fast as the engine goes; --fps paces them: give one")
    if keep_page and no_page:
        raise click.UsageError("--keep-page keeps the live page up: it cannot go with --no-page")
    confirmer = build_confirmer(confirm, twin, device)
    opened = [open_stream_source(text, fps, frames) for text in sources]
    engine = build_engine(engine_path, url, model, version, handle, api_key_env)
    hook = WebhookSink(webhook) if webhook else None
    sinks = [JsonLinesSink(events)] + ([hook] if hook else [])
    counterfactual = counterfactual_engine(counterfactual_path, served=bool(url or handle))
    try:
        watcher = Monitor(engine, sinks=sinks, confirm=confirmer, counterfactual_engine=counterfactual)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--counterfactual-engine") from None
    for text, source in zip(sources, opened):
        watcher.add(monitored_stream(text, source, policy, fps, every_frame))
    server = None
    if not no_page:
        from monitor.web import MonitorServer, MonitorView

        server = MonitorServer(MonitorView(watcher), port=page_port).start()
        click.echo(f"live page: {server.url}", err=True)
    stopped = threading.Event()  # a stop was asked for (SIGTERM, Ctrl-C): the run ends, and so does the page
    try:
        try:
            summary = run_until_stopped(watcher, duration, stopped)
        finally:
            if hook:
                hook.close()
        click.echo(json.dumps({**summary, "events": str(Path(events))}, indent=2, default=str))
        if keep_page and not stopped.is_set():
            serve_until_stopped(server.url, stopped)
    finally:
        if server:
            server.stop()
