"""`audit report RUN_DIR`: an HTML page of a campaign run — summary tables, success and area of effect vs
patch size, robustness under EOT, engine replay, and every trial's before/after overlays, target and patch —
and `summary.json`, strict JSON (a figure that could not be measured is null, never NaN).

Targets are named with the twin's own class names (its `ModelSpec`); a section or column with nothing to show
(no held-out views, no failures, a figure no trial measured) is left out."""

from __future__ import annotations

import html
import json
import math
import shlex
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np

from audit.patch_audit import KIND, plot_inside_shares, summarise_audits
from audit.store import TrialStore
from segmenters.files import atomic_write_text


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """Per (model, patch size): trials, mean/median success, intended flips, area of effect, EOT success.

    Success is measured outside the patch; a trial whose patch covers its whole target has none to measure
    (`covered`) and is left out of the success figures, not counted as a failure or a success."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(Path(row["model"]).name, row["size"])].append(row)
    table = []
    for (model, size), group in sorted(groups.items()):
        metrics = [r["metrics"] for r in group]
        measured = [m["success"] for m in metrics if not _isnan(m["success"])]
        table.append({
            "model": model, "size": size, "trials": len(group), "covered": len(group) - len(measured),
            "success_mean": _mean(measured),
            "success_median": float(np.median(measured)) if measured else float("nan"),
            "succeeded_50": float(np.mean([v >= 0.5 for v in measured])) if measured else float("nan"),
            "success_with_patch_mean": _mean(m.get("success_with_patch") for m in metrics),
            "intended_share_mean": _mean(m.get("intended_share") for m in metrics),
            "intended_flipped_mean": _mean(m["intended_flipped"] for m in metrics),
            "changed_max": int(max(m["changed"] for m in metrics)),
            "area_of_effect_mean": _mean(m["area_of_effect"] for m in metrics),
            "eot_success_mean": _mean(m["eot_success_mean"] for m in metrics),
            "physical_success_mean": _mean(m.get("physical_success_mean") for m in metrics),
        })
    return table


def replay_summary(rows: list[dict]) -> list[dict]:
    by_engine: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        for engine, result in row["replay"].items():
            by_engine[engine].append(result)
    table = []
    for engine, results in sorted(by_engine.items()):
        judged = [r["reproduces"] for r in results if r["reproduces"] is not None]
        table.append({"engine": engine, "trials": len(results), "backend": results[0]["backend"],
                      "precision": results[0]["precision"], "with_flips": len(judged),
                      "reproduced": float(np.mean(judged)) if judged else float("nan"),
                      "intended_reproduced_mean": _mean(r.get("intended_reproduced") for r in results),
                      "agreement_mean": _mean(r["agreement_with_twin"] for r in results)})
    return table


def _plots(rows: list[dict], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in rows})
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in ((axes[0], "success", "success (share of target pixels outside the patch)"),
                           (axes[1], "area_of_effect", "area of effect (changed px / patch px)"),
                           (axes[2], "eot_success_mean", "success under EOT (mean of draws)")):
        data = [[r["metrics"][key] for r in rows if r["size"] == s and not _isnan(r["metrics"][key])] for s in sizes]
        ax.boxplot(data, tick_labels=[f"{s}x{s}" for s in sizes])
        for i, values in enumerate(data, start=1):
            ax.scatter(np.full(len(values), i) + np.random.default_rng(i).uniform(-0.15, 0.15, len(values)), values,
                       s=8, alpha=0.5)
        ax.set_xlabel("patch size")
        ax.set_title(label, fontsize=10)
        if key == "area_of_effect":
            ax.set_yscale("symlog")
        else:
            ax.set_ylim(-0.02, 1.02)
    figure.tight_layout()
    figure.savefig(folder / "by_patch_size.png", dpi=100)
    plt.close(figure)
    return ["by_patch_size.png"]


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _verdict(reproduces) -> str:
    return "no flips" if reproduces is None else ("yes" if reproduces else "no")


def _or_minus_one(value) -> float:
    return -1.0 if _isnan(value) else value


#: how a figure that could not be measured (NaN, None) reads in the page
NOT_MEASURED = "&ndash;"


def _number(value, digits: int = 3) -> str:
    """A figure for the page: `digits` decimals, `NOT_MEASURED` where there is none."""
    if value is None or _isnan(value):
        return NOT_MEASURED
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _table(rows: list[dict], columns: list[str]) -> str:
    """An HTML table; a column no row has a figure for is left out."""
    shown = [c for c in columns if any(r.get(c) is not None and not _isnan(r.get(c)) for r in rows)] or columns[:1]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = "".join("<tr>" + "".join(f"<td>{_number(r.get(c))}</td>" for c in shown) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def strict_json(value):
    """`value` with every NaN or infinity as None and numpy scalars as Python numbers, for `allow_nan=False`."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------- class names
@lru_cache(maxsize=16)
def model_class_names(model_path: str) -> tuple[str, ...] | None:
    """The class names of the twin a trial attacked (its `ModelSpec`); None where the checkpoint cannot be read
    here (a report written away from the twins): the stored description is shown then."""
    from segmenters.spec import ModelSpec
    from segmenters.twin import read_checkpoint

    try:
        return tuple(ModelSpec.from_json(read_checkpoint(model_path)["spec"]).class_names)
    except (FileNotFoundError, ValueError):
        return None


def describe_target(row: dict) -> str:
    """A trial's target in the twin's class names ("car -> road", "person disappears"); a mask target by its
    file; the stored description where the twin's classes are not at hand."""
    stored = row["metrics"].get("description") or row["target"]
    names = model_class_names(row["model"])
    if names is None or row["target"] == "mask":
        return stored

    def name(index) -> str:
        return names[index] if index is not None and 0 <= index < len(names) else f"class {index}"

    if row["target"] == "disappear":
        return f"{name(row['source_class'])} disappears"
    if row["target"] == "switch":
        return f"{name(row['source_class'])} -> {name(row['to_class'])}" if row["source_class"] is not None \
            else f"-> {name(row['to_class'])}"
    return stored


# ------------------------------------------------------------------------------------------- sections
#: a trial's pictures in the order shown, and what each is called in the table's header
TRIAL_PICTURES = {"before.png": "before", "after.png": "after", "target.png": "target", "patch.png": "patch",
                  "physical.png": "held-out views with the patch as a decal",
                  "attribution.png": "VGatt: clean | attacked | attacked image"}


def _attribution_section(attribution: dict | None, audited: int, run: Path) -> str:
    if not attribution:
        return ("<h2>Why the pixels flipped</h2><p>No VGatt audit yet: run "
                f"<code>audit vgatt {html.escape(shlex.quote(str(run)))}</code> (it refreshes this report).</p>")
    if not attribution["successful_trials"]:
        return (f"<h2>Why the pixels flipped (VGatt)</h2><p>{audited} trials audited; none succeeded "
                "(success &ge; 0.5), so there are no flips to explain.</p>" + _completeness_paragraph(attribution))
    return f"""<h2>Why the pixels flipped (VGatt)</h2>
<p>{audited} trials audited; {attribution['successful_trials']} successful (success &ge; 0.5). Share of the positive
VGatt attribution of the flipped pixels that lies inside the patch:
<b>{_number(attribution['inside_share_attacked_mean'])}</b> on the attacked images vs
<b>{_number(attribution['inside_share_clean_mean'])}</b> on the clean images (same pixels, same class); the patch
covers {_number(attribution['patch_area_share_mean'], 4)} of the image. Trial pictures: attribution.png = clean map
| attacked map | attacked image.</p>
{_completeness_paragraph(attribution)}
<img src="inside_patch_attribution.png">"""


def _completeness_paragraph(attribution: dict) -> str:
    """How far contributions + frozen-gate bias miss the score, worst over the audit's maps: relative to the
    contributions first (the headline: a bias near the whole score makes the miss relative to the score small)."""
    if not attribution.get("vgatt_maps"):
        return ""

    def figure(key: str) -> str:
        value = attribution.get(key)
        return NOT_MEASURED if value is None or _isnan(value) else f"{value:.1e}"

    verdict = ("exact: the twin is piecewise affine" if attribution["exact"]
               else "approximate: gates that move with the input (x*g(x), sigmoid, products) are frozen")
    return (f"<p>Completeness, worst of {attribution['vgatt_maps']} maps ({verdict}): contributions + bias miss the "
            f"score by <b>{figure('completeness_error_vs_contributions_max')}</b> of the contributions' sum "
            f"(headline) and {figure('completeness_error_max')} of the score.</p>")


def _replay_section(rows: list[dict]) -> str:
    if not any(r["replay"] for r in rows):
        return "<h2>Engine replay</h2><p>No engines were listed for replay.</p>"
    return "<h2>Engine replay</h2>" + _table(replay_summary(rows), [
        "engine", "backend", "precision", "trials", "with_flips", "reproduced", "intended_reproduced_mean",
        "agreement_mean"])


def _trial_row(row: dict, run: Path, pictures: list[str], with_replay: bool) -> str:
    m = row["metrics"]
    images = "".join(f'<img src="../trials/{row["id"]}/{name}" title="{name}">' for name in pictures
                     if (run / "trials" / row["id"] / name).exists())
    replay = ", ".join(f"{html.escape(k)}: {_verdict(v['reproduces'])} ({_number(v['success'], 2)})"
                       for k, v in row["replay"].items()) or "-"
    cells = [f"<code>{row['id'][:10]}</code>", html.escape(Path(row["model"]).name), str(row["image_index"]),
             html.escape(describe_target(row)), str(row["size"]), _number(m["success"]),
             _number(m.get("success_with_patch")), _number(m["intended_flipped"]), _number(m["changed"]),
             _number(m["area_of_effect"], 1), _number(m["eot_success_mean"]), html.escape(row.get("node") or "-")]
    if with_replay:
        cells.append(replay)
    cells.append(images)
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells[:-1]) + f"<td class='pics'>{cells[-1]}</td></tr>"


def _trials_section(rows: list[dict], run: Path) -> str:
    """Every trial, best first; the header names only the pictures some trial has (no held-out views on
    CamVid, no VGatt maps before an audit)."""
    if not rows:
        return ""
    pictures = [name for name in TRIAL_PICTURES if any((run / "trials" / r["id"] / name).exists() for r in rows)]
    with_replay = any(r["replay"] for r in rows)
    header = ["id", "model", "image", "target", "size", "success outside patch", "incl. patch", "intended px",
              "changed px", "area of effect", "EOT success", "node"] + (["engine replay"] if with_replay else []) + [
              "pictures"]
    ordered = sorted(rows, key=lambda r: (-_or_minus_one(r["metrics"]["success"]), r["size"]))
    return (f"<h2>Trials (best first): {' | '.join(TRIAL_PICTURES[p] for p in pictures)}</h2>\n<table><tr>"
            + "".join(f"<th>{h}</th>" for h in header) + "</tr>\n"
            + "".join(_trial_row(r, run, pictures, with_replay) for r in ordered) + "</table>")


def nodes_summary(rows: list[dict]) -> list[dict]:
    """Per Ray node: how many trials it ran and their mean seconds (a campaign spread over a cluster)."""
    by_node: dict[str, list[float]] = {}
    for row in rows:
        by_node.setdefault(row.get("node") or "unknown", []).append(row.get("seconds") or float("nan"))
    return [{"node": node, "trials": len(seconds), "seconds_mean": _mean(seconds)}
            for node, seconds in sorted(by_node.items())]


def _nodes_section(rows: list[dict]) -> str:
    return "<h2>By node</h2>" + _table(nodes_summary(rows), ["node", "trials", "seconds_mean"]) if rows else ""


def _failures_section(failures: list[dict]) -> str:
    if not failures:
        return ""
    rows = "".join(f"<tr><td><code>{html.escape(f['id'][:10])}</code></td><td>{html.escape(f['error'])}</td></tr>"
                   for f in failures)
    return f"<h2>Failures</h2><table><tr><th>id</th><th>error</th></tr>{rows}</table>"


PAGE_STYLE = """body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px} .pics img{height:96px;image-rendering:pixelated;
margin-right:4px} pre{background:#f4f4f4;padding:1em}"""


def write_report(run_dir: str | Path) -> Path:
    """RUN_DIR/report/index.html and summary.json from the run's store; returns the page's path."""
    run = Path(run_dir)
    if not (run / "trials.sqlite").exists():
        raise FileNotFoundError(f"{run} is not a campaign run (no trials.sqlite)")
    with TrialStore(run) as store:
        rows, failures = store.rows(), store.failures()
        audits = store.audits(KIND)
    out = run / "report"
    out.mkdir(exist_ok=True)
    summary = summarise(rows)
    attribution = summarise_audits(rows, audits) if audits else None
    if attribution and attribution["successful_trials"]:
        plot_inside_shares(attribution, out / "inside_patch_attribution.png")
    atomic_write_text(out / "index.html", _page(run, rows, failures, summary, attribution, len(audits)))
    brief = {k: v for k, v in (attribution or {}).items() if k not in ("attacked", "clean")}
    document = {"by_size": summary, "by_node": nodes_summary(rows), "replay": replay_summary(rows),
                "attribution": brief, "trials": len(rows),
                "failures": len(failures)}
    atomic_write_text(out / "summary.json", json.dumps(strict_json(document), indent=2, allow_nan=False))
    return out / "index.html"


def _page(run: Path, rows: list[dict], failures: list[dict], summary: list[dict], attribution: dict | None,
          audited: int) -> str:
    campaign = (run / "campaign.yaml").read_text() if (run / "campaign.yaml").exists() else ""
    figures = _plots(rows, run / "report") if rows else []
    by_size = ("<h2>By model and patch size</h2>\n" + _table(summary, list(summary[0]))
               + "".join(f'<img src="{f}">' for f in figures)) if summary else ""
    sections = [by_size, _nodes_section(rows), _replay_section(rows), _attribution_section(attribution, audited, run),
                _trials_section(rows, run), _failures_section(failures),
                f"<h2>Campaign file</h2><pre>{html.escape(campaign)}</pre>" if campaign else ""]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>patchwatch campaign report</title>
<style>{PAGE_STYLE}</style></head><body>
<h1>Campaign report</h1>
<p>{len(rows)} trials stored, {len(failures)} failures recorded.</p>
{chr(10).join(s for s in sections if s)}
</body></html>"""
