"""`audit report RUN`: an HTML page of a campaign run — summary tables, success and area of effect vs patch
size, robustness under EOT, engine replay, and every trial's before/after overlays, target and patch."""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
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


def _table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.3f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _attribution_section(attribution: dict | None, audited: int) -> str:
    if not attribution:
        return "<h2>Why the pixels flipped</h2><p>No VGatt audit yet: <code>audit vgatt RUN</code>.</p>"
    if not attribution["successful_trials"]:
        return (f"<h2>Why the pixels flipped (VGatt)</h2><p>{audited} trials audited; none succeeded "
                "(success &ge; 0.5), so there are no flips to explain.</p>")
    return f"""<h2>Why the pixels flipped (VGatt)</h2>
<p>{audited} trials audited; {attribution['successful_trials']} successful (success &ge; 0.5). Share of the positive
VGatt attribution of the flipped pixels that lies inside the patch: <b>{attribution['inside_share_attacked_mean']:.3f}</b>
on the attacked images vs <b>{attribution['inside_share_clean_mean']:.3f}</b> on the clean images (same pixels,
same class); the patch covers {attribution['patch_area_share_mean']:.4f} of the image. Trial pictures:
attribution.png = clean map | attacked map | attacked image.</p>
<img src="inside_patch_attribution.png">"""


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    if not (run / "trials.sqlite").exists():
        raise FileNotFoundError(f"{run} is not a campaign run (no trials.sqlite)")
    with TrialStore(run) as store:
        rows, failures = store.rows(), store.failures()
        audits = store.audits(KIND)
    out = run / "report"
    out.mkdir(exist_ok=True)
    campaign = (run / "campaign.yaml").read_text() if (run / "campaign.yaml").exists() else ""
    summary = summarise(rows)
    figures = _plots(rows, out) if rows else []
    attribution = summarise_audits(rows, audits) if audits else None
    if attribution and attribution["successful_trials"]:
        plot_inside_shares(attribution, out / "inside_patch_attribution.png")
    trial_rows = []
    for row in sorted(rows, key=lambda r: (-_or_minus_one(r["metrics"]["success"]), r["size"])):
        m = row["metrics"]
        images = "".join(f'<img src="../trials/{row["id"]}/{name}" title="{name}">'
                         for name in ("before.png", "after.png", "target.png", "patch.png", "physical.png",
                                      "attribution.png")
                         if (run / "trials" / row["id"] / name).exists())
        replay = ", ".join(f"{k}: {_verdict(v['reproduces'])} ({v['success']:.2f})"
                           for k, v in row["replay"].items()) or "-"
        trial_rows.append(
            f"<tr><td><code>{row['id'][:10]}</code></td><td>{html.escape(Path(row['model']).name)}</td>"
            f"<td>{row['image_index']}</td><td>{html.escape(m.get('description', row['target']))}</td>"
            f"<td>{row['size']}</td><td>{m['success']:.3f}</td><td>{m.get('success_with_patch', float('nan')):.3f}</td><td>{m['intended_flipped']}</td>"
            f"<td>{m['changed']}</td><td>{m['area_of_effect']:.1f}</td><td>{m['eot_success_mean']:.3f}</td>"
            f"<td>{html.escape(replay)}</td><td class='pics'>{images}</td></tr>")
    failure_rows = "".join(f"<tr><td><code>{html.escape(f['id'][:10])}</code></td><td>{html.escape(f['error'])}</td>"
                           "</tr>" for f in failures)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>patchwatch campaign report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}} .pics img{{height:96px;image-rendering:pixelated;
margin-right:4px}} pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>Campaign report</h1>
<p>{len(rows)} trials stored, {len(failures)} failures recorded.</p>
<h2>By model and patch size</h2>
{_table(summary, list(summary[0]) if summary else ["model"])}
{''.join(f'<img src="{f}">' for f in figures)}
<h2>Engine replay</h2>
{_table(replay_summary(rows), ["engine", "backend", "precision", "trials", "with_flips", "reproduced",
                               "intended_reproduced_mean", "agreement_mean"])
 if any(r["replay"] for r in rows) else "<p>No engines were listed for replay.</p>"}
{_attribution_section(attribution, len(audits))}
<h2>Trials (best first): before | after | target | patch | held-out views with the patch as a decal</h2>
<table><tr><th>id</th><th>model</th><th>image</th><th>target</th><th>size</th><th>success outside patch</th><th>incl. patch</th><th>intended px</th>
<th>changed px</th><th>area of effect</th><th>EOT success</th><th>engine replay</th><th>pictures</th></tr>
{''.join(trial_rows)}</table>
<h2>Failures</h2><table><tr><th>id</th><th>error</th></tr>{failure_rows}</table>
<h2>Campaign file</h2><pre>{html.escape(campaign)}</pre>
</body></html>"""
    atomic_write_text(out / "index.html", page)
    brief = {k: v for k, v in (attribution or {}).items() if k not in ("attacked", "clean")}
    atomic_write_text(out / "summary.json", json.dumps({"by_size": summary, "replay": replay_summary(rows),
                                                        "attribution": brief, "trials": len(rows),
                                                        "failures": len(failures)}, indent=2))
    return out / "index.html"
