"""``circuits batch summarize DIR``: merge the results of a batch run (all shards) into one summary.

1. Read every ``DIR/results/<id>.json`` (temp files of a killed write are ignored).
2. Circuits: group the ok trace results by target *family*, the target spec without its position
   (``mlp3:211@7`` -> ``mlp3:211``), plus the group ``all``. For each feature (``mlp1:613``: dictionary and
   index, any position) count the circuits it appears in, and average over those circuits its attribution to
   the target: ``attribution`` (T_s of the hierarchical pass, summed over the feature's positions in that circuit),
   the same divided by the target's value, and the direct edge weight. A job pruned by influence lists the nodes
   of its shown view only.
3. Dashboards: one index page linking every dashboard written, with its scorecard numbers.
4. Write ``DIR/summary.json`` (machine-readable), ``DIR/summary.html`` (plotly, offline) and
   ``DIR/dashboards/index.html``, each atomically.
"""

from __future__ import annotations

import html
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from circuits.sites import FEATURE_KINDS, feature_key
from scripts.batch.worker import RESULTS, read_result



def target_family(spec: str) -> str:
    return re.sub(r"@-?\d+$", "", spec)


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    folder = Path(out_dir) / RESULTS
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: {out_dir} is not the --out folder of a `circuits batch run`")
    results = []
    for p in sorted(folder.glob("*.json")):
        if p.name.startswith("."):
            continue
        r = read_result(p)
        if r is None or "status" not in r:
            raise ValueError(f"{p} is not a readable result; delete it and rerun `circuits batch run` to redo that job")
        results.append(r)
    return results


def feature_table(circuits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step 2 for one group of circuits, most frequent feature first."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for c in circuits:
        per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for n in c["nodes"]:
            if n["kind"] in FEATURE_KINDS:
                key = feature_key(n["kind"], n["layer"], n["feature"])
                per[key]["attribution"] += n["attribution"]
                per[key]["direct"] += n["direct"]
        tv = c["target_value"]
        for key, v in per.items():
            a = acc[key]
            a["n"] += 1
            a["attribution"] += v["attribution"]
            a["direct"] += v["direct"]
            a["relative"] += v["attribution"] / tv if tv else 0.0
    total = len(circuits)
    rows = [dict(feature=key, n_circuits=int(a["n"]), frequency=a["n"] / total, mean_attribution=a["attribution"] / a["n"],
                 mean_relative_attribution=a["relative"] / a["n"], mean_direct=a["direct"] / a["n"]) for key, a in acc.items()]
    rows.sort(key=lambda r: (-r["n_circuits"], -abs(r["mean_attribution"]), r["feature"]))
    return rows


def summarize(out_dir: Path, top: int = 50) -> dict[str, Any]:
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    ok_traces = [r for r in results if r["status"] == "ok" and r["kind"] == "trace"]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ok_traces:
        groups[target_family(r["circuit"]["target"])].append(r["circuit"])
    order = sorted(groups, key=lambda g: (-len(groups[g]), g))
    circuits = dict(all=dict(n_circuits=len(ok_traces), features=feature_table([r["circuit"] for r in ok_traces])[:top]) if ok_traces else None)
    by_target = {g: dict(n_circuits=len(groups[g]), mean_target_value=sum(c["target_value"] for c in groups[g]) / len(groups[g]),
                         features=feature_table(groups[g])[:top]) for g in order}
    dashboards = [dict(e, job=r["id"]) for r in results if r["status"] == "ok" and r["kind"] == "dashboard" for e in r["dashboards"]]
    failed = [dict(id=r["id"], kind=r["kind"], error=r.get("error", "")) for r in results if r["status"] == "failed"]
    manifests = sorted(p.name for p in out_dir.glob("manifest*.json"))
    summary = dict(
        out_dir=str(out_dir), manifests=manifests,
        counts=dict(results=len(results), ok=sum(r["status"] == "ok" for r in results), failed=len(failed),
                    trace_ok=len(ok_traces), dashboard_ok=sum(r["status"] == "ok" and r["kind"] == "dashboard" for r in results),
                    feature_dashboards=len(dashboards)),
        circuits=dict(overall=circuits["all"], by_target=by_target),
        dashboards=[dict(job=d["job"], dictionary=d["dictionary"], feature=d["feature"], page=d["page"]) for d in dashboards],
        failures=failed,
    )
    from saes.io import atomic_write_json

    atomic_write_json(out_dir / "summary.json", summary)
    if ok_traces:
        write_circuit_page(summary, out_dir / "summary.html")
    if dashboards:
        write_dashboard_index(dashboards, out_dir)
    return summary


def _bar(rows: list[dict[str, Any]], title: str, n: int = 25):
    import plotly.graph_objects as go

    rows = rows[:n][::-1]
    hover = [f"<b>{r['feature']}</b><br>in {r['n_circuits']} circuits ({r['frequency']:.1%})<br>mean attribution "
             f"{r['mean_attribution']:.4g} ({r['mean_relative_attribution']:.1%} of target)<br>mean direct {r['mean_direct']:.4g}"
             for r in rows]
    rel = [r["mean_relative_attribution"] for r in rows]
    lim = max((abs(x) for x in rel), default=1.0) or 1.0
    fig = go.Figure(go.Bar(
        x=[r["frequency"] for r in rows], y=[r["feature"] for r in rows], orientation="h", hovertext=hover, hoverinfo="text",
        marker=dict(color=rel, colorscale="RdBu", cmin=-lim, cmax=lim, colorbar=dict(title="mean attribution<br>/ target")),
    ))
    fig.update_layout(title=title, xaxis=dict(title="fraction of circuits containing the feature", tickformat=".0%"),
                      height=max(300, 22 * len(rows) + 120), margin=dict(l=110, r=40, t=60, b=50))
    return fig


def write_circuit_page(summary: dict[str, Any], path: Path, max_groups: int = 12) -> Path:
    """One offline page (plotly.js inline once): the overall table, then each target family's."""
    from saes.io import atomic_write_text

    figs = []
    overall = summary["circuits"]["overall"]
    figs.append(_bar(overall["features"], f"all {overall['n_circuits']} circuits: most frequent features"))
    for g, d in list(summary["circuits"]["by_target"].items())[:max_groups]:
        figs.append(_bar(d["features"], f"target {g} ({d['n_circuits']} circuits, mean value {d['mean_target_value']:.3g})"))
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    c = summary["counts"]
    page = ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>batch summary</title></head>"
            "<body style='font:14px sans-serif'>"
            f"<h2>Batch summary: {html.escape(summary['out_dir'])}</h2>"
            f"<p>{c['trace_ok']} circuits, {c['failed']} failed jobs. Bar length: how often a feature (any position) is in a "
            "circuit; colour: its mean attribution to the target (T_s summed over its positions) as a fraction of the "
            "target's value, over the circuits that contain it. Numbers in summary.json.</p>"
            + "".join(parts) + "</body></html>\n")
    atomic_write_text(path, page)
    return path


def write_dashboard_index(entries: list[dict[str, Any]], out_dir: Path) -> Path:
    """``DIR/dashboards/index.html`` through ``analysis.dashboards.write_index``, written by rename."""
    from analysis.dashboards import write_index
    from saes.io import atomic_write_text

    rows = [dict(e["scorecard"], href=e["page"][len("dashboards/"):], dictionary=e["dictionary"], feature=e["feature"])
            for e in sorted(entries, key=lambda e: (e["dictionary"], e["feature"]))]
    with tempfile.TemporaryDirectory(prefix="batch-index-") as tmp:
        text = write_index(Path(tmp), rows, f"{len(rows)} feature dashboards").read_text(encoding="utf-8")
    path = Path(out_dir) / "dashboards" / "index.html"
    atomic_write_text(path, text)
    return path


def format_summary(summary: dict[str, Any], n: int = 10) -> str:
    c = summary["counts"]
    out = [f"{c['results']} results: {c['ok']} ok, {c['failed']} failed; {c['trace_ok']} circuits, "
           f"{c['feature_dashboards']} feature dashboards"]
    overall = summary["circuits"]["overall"]
    if overall:
        out.append(f"{'feature':<14}{'circuits':>9}{'freq':>8}{'mean attr':>11}{'/target':>9}{'direct':>10}   (all targets)")
        for r in overall["features"][:n]:
            out.append(f"{r['feature']:<14}{r['n_circuits']:>9}{r['frequency']:>8.1%}{r['mean_attribution']:>11.4g}"
                       f"{r['mean_relative_attribution']:>9.1%}{r['mean_direct']:>10.4g}")
    return "\n".join(out)
