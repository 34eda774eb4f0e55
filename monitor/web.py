"""The monitor's operator page and metrics: each stream live with its label overlay, the alarm list, and a
Prometheus exposition, served by Starlette/uvicorn beside the monitor (no Ray needed).

    GET /                        the page (streams refresh their overlay, the alarm table polls /api/alarms)
    GET /streams/{id}/frame.jpg  the newest frame of stream `id` with its labels blended over it
    GET /api/alarms              alarms, newest first (JSON)
    GET /api/streams             per-stream stats by name, each with its `id` (JSON)
    GET /metrics                 Prometheus text: frames, alarms, stream events, FPS and latency per stream
    GET /healthz

A stream's name is free text (a file path, an rtsp:// URL, spaces, any script), so URLs carry its id, the stream's
position in the monitor (0, 1, ...), and the page shows the name as escaped text only.
"""

from __future__ import annotations

import html
import json
import threading
import time

import cv2
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from segmenters.visualize import overlay

LATENCY_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>patchwatch monitor</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 1.2em; background: #fafafa; }}
 .streams {{ display: flex; flex-wrap: wrap; gap: 1em; }}
 figure {{ margin: 0; background: #fff; padding: .5em; border: 1px solid #ddd; }}
 figure.alarm {{ border: 3px solid #d00; }}
 img {{ image-rendering: pixelated; width: {width}px; }}
 table {{ border-collapse: collapse; margin-top: 1em; background: #fff; }}
 td, th {{ border: 1px solid #ccc; padding: .25em .6em; font-size: 90%; }}
</style></head>
<body>
<h1>patchwatch monitor</h1>
<p>{engine}</p>
<div class="streams">{figures}</div>
<h2>Alarms</h2>
<table id="alarms"><thead><tr><th>stream</th><th>frame</th><th>onset</th><th>from</th><th>to</th><th>pixels</th>
<th>region (t, l, b, r)</th><th>image change</th><th>time</th></tr></thead><tbody></tbody></table>
<script>
const streams = {streams};
function refreshFrames() {{
  for (const s of streams) {{
    document.getElementById('img-' + s.id).src = 'streams/' + s.id + '/frame.jpg?t=' + Date.now();
  }}
}}
async function refreshAlarms() {{
  const alarms = await (await fetch('api/alarms')).json();
  const body = document.querySelector('#alarms tbody');
  body.innerHTML = '';
  const alarmed = new Set();
  for (const a of alarms) {{
    alarmed.add(a.stream);
    const row = body.insertRow();
    row.className = 'alarm-row';
    for (const v of [a.stream, a.frame, a.onset_frame, a.from_name, a.to_name, a.pixels, a.bbox.join(', '),
                     a.image_change.toFixed(3), new Date(a.time * 1000).toLocaleTimeString()]) {{
      row.insertCell().textContent = v;
    }}
  }}
  for (const s of streams) {{
    document.getElementById('fig-' + s.id).classList.toggle('alarm', alarmed.has(s.name));
  }}
}}
refreshFrames(); refreshAlarms();
setInterval(refreshFrames, {frame_ms}); setInterval(refreshAlarms, {alarm_ms});
</script>
</body></html>
"""


def script_json(value) -> str:
    """`value` as JSON that is safe inside an HTML <script>: no "</script>" or "<!--" a name could close it with."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class MonitorView:
    """What the page shows, fed by the monitor's `on_frame` hook and read by the HTTP handlers."""

    def __init__(self, monitor, width: int = 320, jpeg_quality: int = 85):
        self.monitor, self.width, self.jpeg_quality = monitor, width, jpeg_quality
        self._frames: dict[str, bytes] = {}
        self._lock = threading.Lock()
        palette = monitor.engine.spec.palette()
        self._palette = np.asarray(palette, dtype=np.uint8)
        registry = self.registry = CollectorRegistry()
        self.frames = Counter("patchwatch_monitor_frames", "Frames judged by the flip detector", ["stream"],
                              registry=registry)
        self.alarms = Counter("patchwatch_monitor_alarms", "Flip alarms raised", ["stream", "from_class", "to_class"],
                              registry=registry)
        self.stream_events = Counter("patchwatch_monitor_stream_events", "Stream events (drops, bad frames, ...)",
                                     ["stream", "kind"], registry=registry)
        self.latency = Histogram("patchwatch_monitor_latency_seconds", "Capture to judged, per frame", ["stream"],
                                 buckets=LATENCY_S, registry=registry)
        self.fps = Gauge("patchwatch_monitor_fps", "Frames judged per second", ["stream"], registry=registry)
        self.dropped = Gauge("patchwatch_monitor_dropped_frames", "Frames the stream's buffer dropped (overload)",
                             ["stream"], registry=registry)
        previous = monitor.on_frame
        monitor.on_frame = lambda frame, labels, alarms: (self.on_frame(frame, labels, alarms),
                                                          previous and previous(frame, labels, alarms))
        monitor.sinks.append(self.on_event)

    def on_frame(self, frame, labels, alarms) -> None:
        self.frames.labels(frame.stream).inc()
        self.latency.labels(frame.stream).observe(max(0.0, time.monotonic() - frame.captured))
        picture = overlay(frame.rgb, labels, self._palette)
        # outline the regions that raised an alarm for as long as they last, not only on the alarm's frame
        for region in list(self.monitor.detectors[frame.stream].active):
            contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(picture, contours, -1, (255, 255, 0), 1)
        height, width = picture.shape[:2]
        if width < self.width:  # upscale small frames so an operator can see them; nearest keeps labels crisp
            picture = cv2.resize(picture, (self.width, round(height * self.width / width)),
                                 interpolation=cv2.INTER_NEAREST)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if ok:
            with self._lock:
                self._frames[frame.stream] = jpeg.tobytes()

    def on_event(self, event: dict) -> None:
        if event.get("type") == "flip":
            self.alarms.labels(event["stream"], event["from_name"], event["to_name"]).inc()
        elif event.get("type") == "stream":
            self.stream_events.labels(event["stream"], event["kind"]).inc()

    def frame(self, stream: str) -> bytes | None:
        with self._lock:
            return self._frames.get(stream)

    def stream_names(self) -> list[str]:
        """The monitored streams' names; a stream's id in the page's URLs is its position here (streams are only
        ever added, so an id keeps naming the same stream)."""
        return list(self.monitor.streams)

    def metrics(self) -> bytes:
        for name, stream in self.monitor.streams.items():
            stats = self.monitor.stats[name].as_dict(stream)
            self.fps.labels(name).set(stats["fps"])
            self.dropped.labels(name).set(stats["dropped"])
        return generate_latest(self.registry)

    def page(self, frame_ms: int = 200, alarm_ms: int = 500) -> str:
        names = self.stream_names()
        figures = "".join(f'<figure id="fig-{i}"><img id="img-{i}" alt="{html.escape(n)}">'
                          f"<figcaption>{html.escape(n)}</figcaption></figure>" for i, n in enumerate(names))
        engine = html.escape(", ".join(f"{k}: {v}" for k, v in self.monitor.engine.describe().items()))
        streams = script_json([{"id": i, "name": n} for i, n in enumerate(names)])
        return PAGE.format(width=self.width, engine=engine, figures=figures, streams=streams,
                           frame_ms=frame_ms, alarm_ms=alarm_ms)


def monitor_app(view: MonitorView):
    """The Starlette application over a `MonitorView`."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    async def index(request):
        return HTMLResponse(view.page())

    async def frame(request):
        stream_id, names = request.path_params["stream_id"], view.stream_names()
        if stream_id >= len(names):
            return JSONResponse({"error": f"no stream {stream_id}: {len(names)} streams are monitored (ids from 0)"},
                                status_code=404)
        data = view.frame(names[stream_id])
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def alarms(request):
        return JSONResponse([a.as_dict() for a in reversed(view.monitor.alarms)])

    async def streams(request):
        stats = view.monitor.summary()["streams"]
        return JSONResponse({name: {"id": i, **stats[name]} for i, name in enumerate(view.stream_names())})

    async def metrics(request):
        return Response(view.metrics(), media_type=CONTENT_TYPE_LATEST)

    async def health(request):
        return JSONResponse({"ok": True, "streams": len(view.monitor.streams)})

    return Starlette(routes=[Route("/", index), Route("/streams/{stream_id:int}/frame.jpg", frame),
                             Route("/api/alarms", alarms), Route("/api/streams", streams),
                             Route("/metrics", metrics), Route("/healthz", health)])


class MonitorServer:
    """uvicorn on its own thread, serving `monitor_app` on host:port (port 0: any free port)."""

    def __init__(self, view: MonitorView, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(monitor_app(view), log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> MonitorServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError(f"the monitor page did not start on {self.url}")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()
