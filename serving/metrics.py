"""Prometheus metrics, per model, through Ray Serve's metrics API: Ray's metrics agent exports them on every
node's metrics port (with a `ray_` prefix, e.g. `ray_patchwatch_requests_total`), where a cluster's Prometheus
scrapes them; the ingress's `GET /metrics` shows the head node's patchwatch and Serve families."""

from __future__ import annotations

from ray.serve import metrics

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
#: the metric families `GET /metrics` keeps from the node's exposition
EXPORTED_PREFIXES = ("ray_patchwatch_", "ray_serve_")


class IngressMetrics:
    """Requests as the front door sees them: count by status code, latency, and errors by reason."""

    def __init__(self):
        self.requests = metrics.Counter(
            "patchwatch_requests", description="HTTP requests answered, by model, endpoint and status code",
            tag_keys=("model", "endpoint", "code"))
        self.latency = metrics.Histogram(
            "patchwatch_request_latency_ms", description="Time from request received to response ready (ms)",
            boundaries=LATENCY_MS, tag_keys=("model", "endpoint"))
        self.errors = metrics.Counter(
            "patchwatch_request_errors", description="Requests answered with an error, by model and reason",
            tag_keys=("model", "endpoint", "reason"))

    def record(self, model: str, endpoint: str, code: int, latency_ms: float, reason: str | None = None) -> None:
        model = model or "-"
        self.requests.inc(1, tags={"model": model, "endpoint": endpoint, "code": str(code)})
        self.latency.observe(latency_ms, tags={"model": model, "endpoint": endpoint})
        if code >= 400:
            self.errors.inc(1, tags={"model": model, "endpoint": endpoint, "reason": reason or str(code)})


class ModelMetrics:
    """Engine runs inside a model replica: images per batch and engine time. Images are also counted exactly:
    Ray exports a histogram's `_sum` from bucket midpoints, so images / runs comes from the counter."""

    def __init__(self, name: str, version: str):
        tags = {"model": name, "version": version}
        self.images = metrics.Counter(
            "patchwatch_images", description="Images run through the engine", tag_keys=("model", "version"))
        self.images.set_default_tags(dict(tags))
        self.batch_size = metrics.Histogram(
            "patchwatch_batch_size", description="Images per engine run (dynamic batching)",
            boundaries=BATCH_SIZES, tag_keys=("model", "version"))
        self.batch_size.set_default_tags(dict(tags))  # Serve adds its own tags to the dict it is given
        self.engine_latency = metrics.Histogram(
            "patchwatch_engine_latency_ms", description="Engine time per batch (ms)",
            boundaries=LATENCY_MS, tag_keys=("model", "version"))
        self.engine_latency.set_default_tags(dict(tags))

    def observe_batch(self, images: int, latency_ms: float) -> None:
        self.images.inc(images)
        self.batch_size.observe(images)
        self.engine_latency.observe(latency_ms)


def exported_families(exposition: str) -> str:
    """Keep the patchwatch and Serve families of a Prometheus text exposition (HELP/TYPE lines included)."""
    kept = []
    for line in exposition.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("# ") and line.count(" ") >= 2 else line
        if name.startswith(EXPORTED_PREFIXES):
            kept.append(line)
    return "\n".join(kept) + "\n"


def node_metrics_url() -> str:
    """The Prometheus endpoint of the Ray metrics agent on the node this process runs on."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    raise RuntimeError(f"node {node_id} is not in the cluster's node table")
