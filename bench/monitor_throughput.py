"""How much of the engine's throughput the flip monitor keeps, with the engine in this process and in its own
process (as behind Ray Serve), and where the monitor's time goes (issue 15).

The engine in its own process runs as a Serve replica does: with the ONNX Runtime threads `serving.config.
ModelConfig` gives a replica of `--replica-cpus` CPUs (default: a replica's default, 1), so on this 2-core machine
it holds one core and the monitor the other. In process, ONNX Runtime takes every core, as it does in a script.

Per placement, on the same synthetic moving-camera clips (`--streams` of `--frames` each) and the same engine
object: the engine alone (one batch of one frame per stream at a time), then the whole `monitor.pipeline.Monitor`
(stream threads, bounded queues filled before the clock starts, batching across streams, one detector per stream
on its thread pool), alternated `--repeats` times with the other placements and with the detector alone (each
clip's frames through one `FlipDetector`, labels computed beforehand, one thread): the median of the per-round
ratios pipeline/engine is the share kept. Each round also records CPU ms per frame (this process's threads plus
the engine process's), the share of the monitor's time spent inside engine calls (below 1: the engine waited
for the monitor) and the load average: this machine is shared, compare rounds, not runs. `--spin both` adds
engines whose ONNX Runtime threads do not spin-wait; `--also-workers N` runs each placement again with N
detector threads. `--profile` times every line of `monitor.flips` while the detector runs alone (a line tracer:
exclusive times, grouped into steps; tracing inflates the total, read the shares).

    python bench/monitor_throughput.py [--engine bench/results/shapes/unet.onnx] [--streams 4] [--repeats 5]
        [--spin on|off|both] [--also-workers 1] [--profile]   # -> bench/results/monitor/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

# run as a script, this folder comes first on the path: the repository root takes its place, so bench.engine_process
# imports here and in the spawned engine process, and no bench script can shadow a package of the same name
REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "bench")]

PLACEMENTS = ("in_process", "own_process")


def make_clips(size: tuple[int, int], streams: int, frames: int) -> list[list[np.ndarray]]:
    """One moving-camera clip per stream, each its own scene and phase."""
    from monitor.cameras import CameraPath, SyntheticCamera

    clips = []
    for s in tqdm(range(streams), desc="render clips"):
        camera = SyntheticCamera(s, size=size, frames=frames, path=CameraPath(phase=s))
        camera.open()
        clips.append([camera.read()[0] for _ in range(frames)])
    return clips


def cpu_seconds(engine) -> float:
    """CPU time of this process's threads and of the engine's own process, if it has one."""
    import psutil

    spent = time.process_time()
    if getattr(engine, "pid", None) is not None:
        times = psutil.Process(engine.pid).cpu_times()
        spent += times.user + times.system
    return spent


def engine_alone(engine, clips) -> tuple[float, float]:
    """Frames/s and CPU ms per frame of the engine alone: one batch of one frame per stream at a time, as the
    monitor batches them."""
    frames = len(clips) * len(clips[0])
    started, cpu = time.perf_counter(), cpu_seconds(engine)
    for i in range(len(clips[0])):
        engine.segment(np.stack([clip[i] for clip in clips]))
    return frames / (time.perf_counter() - started), 1000 * (cpu_seconds(engine) - cpu) / frames


class TimedEngine:
    """The engine as the monitor holds it, counting the seconds spent in `segment` (everything else delegated)."""

    def __init__(self, engine):
        self.engine, self.busy = engine, 0.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def segment(self, frames):
        started = time.perf_counter()
        try:
            return self.engine.segment(frames)
        finally:
            self.busy += time.perf_counter() - started


def pipeline(engine, clips, detect_workers: int | None, config=None, counterfactual=None
             ) -> tuple[float, float, dict]:
    """Frames/s and CPU ms per frame of the whole monitor over in-memory streams whose queues hold the whole clip
    before the clock starts: every frame is processed, so this measures buffers, batching and detectors, not
    sources or drops. The summary's "engine_busy_share" is the share of the time the monitor was in an engine
    call (1.0: the engine never waited for the monitor). `counterfactual`: the engine the detectors'
    counterfactuals run on (default: `engine`)."""
    from monitor.flips import FlipConfig
    from monitor.pipeline import Monitor
    from monitor.streams import ReplaySource, Stream

    per_stream = len(clips[0])
    engine = TimedEngine(engine)
    monitor = Monitor(engine, flip_config=config or FlipConfig(), max_batch=len(clips), detect_workers=detect_workers,
                      counterfactual_engine=counterfactual)
    for s, clip in enumerate(clips):
        monitor.add(Stream(ReplaySource(clip, name=f"cam{s}"), policy="drop_oldest", capacity=per_stream)).start()
    while any(len(s.buffer) < per_stream and not s.ended.is_set() for s in monitor.streams.values()):
        time.sleep(0.01)
    started, cpu = time.perf_counter(), cpu_seconds(engine)
    summary = monitor.run(duration=600)
    spent, cpu = time.perf_counter() - started, cpu_seconds(engine) - cpu
    processed = sum(s["processed"] for s in summary["streams"].values())
    if processed != len(clips) * per_stream:
        raise RuntimeError(f"the monitor processed {processed} of {len(clips) * per_stream} frames: {summary}")
    summary["engine_busy_share"] = engine.busy / spent
    return processed / spent, 1000 * cpu / processed, summary


def detector_alone(clips, labels, names, config) -> float:
    """Frames/s of the detectors alone, one thread: each clip through its own `FlipDetector`."""
    from monitor.flips import FlipDetector

    started = time.perf_counter()
    for s, (clip, clip_labels) in enumerate(zip(clips, labels)):
        detector = FlipDetector(names, f"cam{s}", config)
        for index, (rgb, label) in enumerate(zip(clip, clip_labels)):
            detector.update(index, rgb, label)
    return sum(map(len, clips)) / (time.perf_counter() - started)


def throughput(engine, streams: int = 4, frames_per_stream: int = 150, repeats: int = 5,
               detect_workers: int | None = None, clips=None) -> dict:
    """Engine alone vs the monitor on `engine`, alternated `repeats` times; the median per-round ratio is the
    share kept (bench/monitor.py's measurement, for one engine)."""
    return throughput_placements({"engine": (engine, detect_workers)}, streams, frames_per_stream, repeats,
                                 clips)["engine"]


def throughput_placements(placements: dict, streams: int, frames_per_stream: int, repeats: int, clips=None,
                          config=None) -> dict:
    """`throughput` for several placements (name -> (engine, detector threads or None for the monitor's
    choice[, the counterfactuals' engine])) and the detector alone, all alternated round by round."""
    from monitor.flips import FlipConfig

    config = config or FlipConfig()
    first = next(iter(placements.values()))[0]
    clips = clips or make_clips(tuple(first.spec.input_size), streams, frames_per_stream)
    labels = [first.segment(np.stack(clip)) for clip in clips]
    names = [c.name for c in first.spec.classes]
    for engine, *_ in placements.values():  # warm up: sessions built, pools started
        engine.segment(np.stack([clip[0] for clip in clips]))
    rounds = {name: [] for name in placements}
    detector = []
    for _ in tqdm(range(repeats), desc=f"rounds ({'; '.join(placements)}; detector alone)"):
        for name, placement in placements.items():
            engine, workers, counterfactual = (*placement, None)[:3]
            load = os.getloadavg()[0]
            alone, alone_cpu = engine_alone(engine, clips)
            piped, piped_cpu, summary = pipeline(engine, clips, workers, config, counterfactual)
            rounds[name].append({"engine_fps": alone, "pipeline_fps": piped, "kept_share": piped / alone,
                                 "engine_cpu_ms_per_frame": alone_cpu, "pipeline_cpu_ms_per_frame": piped_cpu,
                                 "load_1min": load, "detect_workers": summary["detect_workers"],
                                 "engine_busy_share": summary["engine_busy_share"],
                                 "latency_ms_p50": statistics.median(
                                     s["latency_ms_p50"] for s in summary["streams"].values())})
        detector.append(detector_alone(clips, labels, names, config))
    result = {name: summarise(rows, placements[name][0], streams, frames_per_stream) for name, rows in rounds.items()}
    result["detector"] = {"fps_one_thread": statistics.median(detector), "rounds": detector,
                          "ms_per_frame": 1000.0 / statistics.median(detector)}
    return result


def summarise(rounds: list[dict], engine, streams: int, frames_per_stream: int) -> dict:
    median = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    return {"streams": streams, "frames_per_stream": frames_per_stream, "repeats": len(rounds),
            "engine_fps": median("engine_fps"), "pipeline_fps": median("pipeline_fps"),
            "kept_share": median("kept_share"), "engine_ms_per_frame": 1000.0 / median("engine_fps"),
            "pipeline_ms_per_frame": 1000.0 / median("pipeline_fps"), "latency_ms_p50": median("latency_ms_p50"),
            "engine_cpu_ms_per_frame": median("engine_cpu_ms_per_frame"),
            "engine_busy_share": median("engine_busy_share"),
            "pipeline_cpu_ms_per_frame": median("pipeline_cpu_ms_per_frame"),
            "detect_workers": rounds[0]["detect_workers"], "load_1min": [r["load_1min"] for r in rounds],
            "engine": engine.describe(), "rounds": rounds}


# ------------------------------------------------------------------------------------------ detector profile
def code_objects(module) -> set:
    """Every function's code in `module`, its classes' methods and what they nest (lambdas, generators)."""
    import inspect
    import types

    roots = [f for _, f in inspect.getmembers(module, inspect.isfunction) if f.__module__ == module.__name__]
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__:
            roots += [f for _, f in inspect.getmembers(cls, inspect.isfunction) if f.__module__ == module.__name__]
    codes, todo = set(), [f.__code__ for f in roots]
    while todo:
        code = todo.pop()
        codes.add(code)
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType) and c not in codes]
    return codes


class LineTimer:
    """Exclusive time per source line of the given code objects (a line's time stops while a timed function it
    calls runs; time in untimed calls, NumPy's and OpenCV's, stays with the line), with sys.settrace."""

    def __init__(self, codes):
        self.codes = set(codes)
        self.times: dict[tuple, float] = {}
        self._line, self._stack, self._last = None, [], 0.0

    def _charge(self) -> None:
        if self._line is not None:
            self.times[self._line] = self.times.get(self._line, 0.0) + time.perf_counter() - self._last

    def _local(self, frame, event, arg):
        self._charge()
        if event == "line":
            self._line = (frame.f_code, frame.f_lineno)
        elif event == "return":
            self._line = self._stack.pop() if self._stack else None
        self._last = time.perf_counter()
        return self._local

    def _global(self, frame, event, arg):
        if event != "call" or frame.f_code not in self.codes:
            return None
        self._charge()
        self._stack.append(self._line)
        self._line, self._last = (frame.f_code, frame.f_code.co_firstlineno), time.perf_counter()
        return self._local

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


def step_of(function: str, source: str) -> str:
    """A detector line's step, by its function (and, in the big ones, by what the line calls)."""
    if function == "_flow_maps":
        return "optical flow (DIS)" if ".calc" in source or "Farneback" in source else "flow: resizes and maps"
    if function == "_compare":
        if "blur" in source or "np.abs" in source:
            return "change maps (|difference|, blurs)"
        return "compare: ages and masks (np.where, &)" if "np.where" in source or "&" in source else "compare: glue"
    if function == "update":
        return "input (gray, float image, bincount)" if any(
            k in source for k in ("cvtColor", "astype", "bincount")) else "update: glue"
    names = {"_warp": "warps (cv2.remap)", "_open": "morphology (open)", "_disk": "morphology (open)",
             "_is_still": "still-camera check", "_learn": "learn (state update)",
             "_learn_areas": "learn (state update)", "__create_fn__": "update: glue", "__init__": "update: glue"}
    if function in names:
        return names[function]
    if function in ("_judge", "_candidates", "_trigger", "_occlusion_check", "_alarm"):
        return "judge: components, triggers, alarms"
    return function


def source_as_imported(module, codes) -> list[str]:
    """The module's source lines, refused when the file changed since it was imported (its functions would no
    longer start where their code says, and the profile's lines would be mislabelled)."""
    import linecache

    linecache.checkcache(module.__file__)
    lines = linecache.getlines(module.__file__)
    for code in codes:
        if code.co_name.startswith("<") or code.co_filename != module.__file__:
            continue  # lambdas, generator expressions, dataclasses' generated methods
        head = lines[code.co_firstlineno - 1:code.co_firstlineno + 3]  # decorators come first
        if not any(f"def {code.co_name}(" in line for line in head):
            raise RuntimeError(f"{module.__file__} changed since it was imported: rerun to profile it")
    return lines


def detector_profile(clips, labels, names, config=None) -> dict:
    """Where `FlipDetector.update`'s time goes at the clips' size: per step, per function and the top lines, in
    ms per frame (traced; the untraced figure says how much tracing adds)."""
    from monitor import flips

    config = config or flips.FlipConfig()
    codes = code_objects(flips)
    source = source_as_imported(flips, codes)
    untraced_fps = detector_alone(clips, labels, names, config)
    with LineTimer(codes) as timer:
        traced_fps = detector_alone(clips, labels, names, config)
    frames = sum(map(len, clips))
    # a lambda's or generator expression's lines count for the function it is in
    owner = lambda code: code.co_qualname.split(".<locals>.")[0].split(".")[-1]  # noqa: E731
    rows = sorted(((1000 * t / frames, owner(code), line, source[line - 1].strip())
                   for (code, line), t in timer.times.items()), key=lambda row: -row[0])
    steps, functions = {}, {}
    for ms, function, _, source in rows:
        step = step_of(function, source)
        steps[step] = steps.get(step, 0.0) + ms
        functions[function] = functions.get(function, 0.0) + ms
    total = sum(steps.values())
    ordered = lambda table: {k: round(v, 4) for k, v in sorted(table.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {"size": list(clips[0][0].shape[:2]), "frames": frames, "ms_per_frame_untraced": 1000 / untraced_fps,
            "ms_per_frame_traced": 1000 / traced_fps, "ms_per_frame_in_lines": total,
            "steps_ms": ordered(steps), "steps_share": {k: round(v / total, 3) for k, v in ordered(steps).items()},
            "functions_ms": ordered(functions),
            "lines": [{"ms": round(ms, 4), "function": f, "line": n, "source": src} for ms, f, n, src in rows[:40]]}


# ------------------------------------------------------------------------------------------------ the script
def onnx_engine(path: str, spin: bool = True, **options):
    """An `OnnxRuntimeEngine`, its threads spin-waiting or not; a module-level function, so an engine process can
    build it too."""
    from export import OnnxRuntimeEngine

    return OnnxRuntimeEngine(path, spin=spin, **options)


def open_engines(args) -> dict:
    """Placement name -> engine: ONNX Runtime here, and the same file in an engine process; with and/or without
    spin-waiting threads (--spin)."""
    from bench.engine_process import ProcessEngine

    engines = {}
    for spin in {"on": [True], "off": [False], "both": [True, False]}[args.spin]:
        suffix = "" if spin else ", no spin"
        options = dict(spin=spin, threads=args.engine_threads, device="cpu")
        if "in_process" in args.placements:
            engines["in_process" + suffix] = onnx_engine(args.engine, **options)
        if "own_process" in args.placements:
            engines["own_process" + suffix] = ProcessEngine(args.engine, transport=args.transport,
                                                            factory=onnx_engine, **replica_options(options, args))
    return engines


def replica_options(options: dict, args) -> dict:
    """The engine process as a Serve replica runs it: with the threads `serving.config.ModelConfig` gives a
    replica of `--replica-cpus` CPUs (unless --engine-threads says otherwise)."""
    from serving.config import ModelConfig

    given = {"num_cpus": args.replica_cpus} if args.replica_cpus is not None else {}
    replica = ModelConfig(name="engine", path=args.engine, threads=args.engine_threads, **given)
    return options | {"threads": replica.engine_threads}


def placements_of(engines: dict, args) -> dict:
    """What the rounds run: each placement with the monitor's (or --detect-workers') detector threads, and again
    with each of --also-workers (the same engine object)."""
    placements = {name: (engine, args.detect_workers) for name, engine in engines.items()}
    for workers in args.also_workers:
        placements.update({f"{name}, {workers} detector threads": (engine, workers)
                           for name, engine in engines.items()})
    if args.local_counterfactual:  # where the engine computes elsewhere: its counterfactuals on the monitor's core
        local = onnx_engine(args.engine, threads=1, device="cpu")
        placements.update({f"{name}, local counterfactual": (engine, args.detect_workers, local)
                           for name, engine in engines.items() if name.startswith("own_process")})
    return placements


def report(result: dict) -> None:
    for name, row in result["throughput"].items():
        if name == "detector":
            continue
        print(f"{name}: pipeline keeps {row['kept_share']:.1%} of the engine's frames/s (goal >= 90%): "
              f"{row['pipeline_fps']:.1f} vs {row['engine_fps']:.1f} frames/s; CPU "
              f"{row['pipeline_cpu_ms_per_frame']:.1f} vs {row['engine_cpu_ms_per_frame']:.1f} ms/frame; in an "
              f"engine call {row['engine_busy_share']:.1%} of the time; {row['detect_workers']} detector threads; "
              f"load {min(row['load_1min']):.1f}-{max(row['load_1min']):.1f}")
    detector = result["throughput"]["detector"]
    print(f"detector alone: {detector['ms_per_frame']:.2f} ms/frame (one thread)")
    if result.get("profile"):
        for step, ms in result["profile"]["steps_ms"].items():
            print(f"    {step:<42} {ms:6.3f} ms/frame ({result['profile']['steps_share'][step]:.0%})")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="bench/results/shapes/unet.onnx")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--frames", type=int, default=150, help="frames per stream")
    parser.add_argument("--repeats", type=int, default=5, help="alternated rounds")
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    parser.add_argument("--transport", choices=("shm", "pipe"), default="shm", help="the engine process's")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="ONNX Runtime threads in both placements (default: its own in process; in its own "
                        "process, a Serve replica's: see --replica-cpus)")
    parser.add_argument("--replica-cpus", type=float, default=None,
                        help="CPUs of the engine process, as a Serve replica's num_cpus (default: a replica's)")
    parser.add_argument("--spin", choices=("on", "off", "both"), default="on",
                        help="ONNX Runtime's spin-waiting threads (on: its default)")
    parser.add_argument("--detect-workers", type=int, default=None, help="default: the monitor's own choice")
    parser.add_argument("--also-workers", type=int, nargs="*", default=[],
                        help="also run each placement with these detector thread counts")
    parser.add_argument("--profile", action="store_true", help="also time the detector line by line")
    parser.add_argument("--look-from", type=float, help="FlipConfig.look_from (default: its own)")
    parser.add_argument("--local-counterfactual", action="store_true", help="also run the engine-process placement "
                        "with the counterfactuals on a local one-thread copy of the engine (Monitor's "
                        "counterfactual_engine, `patchwatch monitor --counterfactual-engine`)")
    parser.add_argument("--out", default="bench/results/monitor/throughput.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import cv2

    from monitor.flips import FlipConfig

    cv2.setNumThreads(1)  # as bench/monitor.py: the detector threads are the parallelism, not OpenCV's own
    engines = open_engines(args)
    try:
        first = next(iter(engines.values()))
        clips = make_clips(tuple(first.spec.input_size), args.streams, args.frames)
        result = {"args": vars(args), "cpus": os.cpu_count()}
        if args.profile:  # first: the longer the run, the likelier monitor/flips.py changes on disk meanwhile
            labels = [first.segment(np.stack(clip)) for clip in clips]
            result["profile"] = detector_profile(clips, labels, [c.name for c in first.spec.classes])
        config = FlipConfig(**({"look_from": args.look_from} if args.look_from else {}))
        result["throughput"] = throughput_placements(placements_of(engines, args), args.streams, args.frames,
                                                     args.repeats, clips, config)
    finally:
        for engine in engines.values():
            getattr(engine, "close", lambda: None)()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    report(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
