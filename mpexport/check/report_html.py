"""A self-contained HTML parity report: verdict, thresholds, metrics tables, and per output an error
histogram and an error-vs-magnitude plot for every backend (inline SVG, no scripts, no external files)."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from mpexport.check.report import trained_accuracy_line

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
WIDTH, HEIGHT, PAD = 460, 220, 36


def render_html(report: Any) -> str:
    """The report as one HTML page."""
    verdict = report.verdict
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mpexport parity report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
        ".pass{color:#2a7d2a}.fail{color:#c0392b}.plots{display:flex;flex-wrap:wrap;gap:1em}"
        "svg{background:#fff;border:1px solid #ddd}code{background:#f4f4f4;padding:1px 4px}",
        "</style></head><body>",
        f"<h1>Parity report: <span class='{verdict}'>{verdict.upper()}</span></h1>",
        f"<p>{report.samples} samples from <code>{html.escape(report.data)}</code>; reference "
        f"<b>{html.escape(report.reference)}</b>.</p>",
    ]
    if report.trained:
        warn = " class='fail'" if report.trained.get("likely_not_trained_model") else ""
        parts.append(f"<p{warn}>{html.escape(trained_accuracy_line(report.trained))}</p>")
    if report.failures:
        parts.append("<h2>Failures</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in report.failures)
                     + "</ul>")
    if getattr(report, "repair", None):
        parts.append(_repair_section(report.repair))
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    if report.localisation:
        parts.append("<h2>First nodes out of budget (strict emulation vs FP32)</h2><table><tr><th>node</th>"
                     "<th>op</th><th>module</th><th>precision</th><th>observed</th><th>plan reason</th></tr>")
        for row in report.localisation:
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(row.get(key, '')))}</td>" for key in
                         ("node", "op_type", "module", "precision", "observed", "reason")) + "</tr>")
        parts.append("</table>")
    parts.append(_backends_table(report.backends))
    outputs = sorted({name for metrics in report.metrics.values() for name in metrics})
    for output in outputs:
        parts.append(f"<h2>Output <code>{html.escape(output)}</code></h2>")
        parts.append(_metrics_table(report, output))
        series = {backend: metrics[output] for backend, metrics in report.metrics.items() if output in metrics}
        parts.append("<div class='plots'>" + _histogram(series) + _scatter(series) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _repair_section(repair: dict[str, Any]) -> str:
    macs = repair.get("macs", {})
    share = ""
    if macs.get("low_precision_share_before") is not None:
        share = (f" Low-precision share of the multiply-accumulates: {macs['low_precision_share_before']:.1%} before, "
                 f"{macs['low_precision_share_after']:.1%} after ({macs['moved_to_fp32']:,} moved to FP32).")
    rows = "".join(f"<tr><td>{html.escape(item['node'])}</td><td>{html.escape(item['op_type'])}</td>"
                   f"<td>{html.escape(str(item['module'] or ''))}</td>"
                   f"<td style='text-align:left'>{html.escape(item['reason'])}</td></tr>"
                   for item in repair.get("added_fp32", []))
    return (f"<h2>Repair</h2><p>{len(repair.get('nodes', []))} nodes kept FP32 after {repair.get('trials')} trials."
            f"{html.escape(share)}</p><table><tr><th>node</th><th>op</th><th>module</th><th>why</th></tr>{rows}"
            "</table>")


def _backends_table(backends: dict[str, dict[str, Any]]) -> str:
    rows = ["<h2>Backends</h2><table><tr><th>backend</th><th>state</th><th>seconds</th><th>note</th></tr>"]
    for name, info in backends.items():
        note = info.get("why") or info.get("mode") or ""
        state = info.get("state", "ran" if info.get("ran") else "skipped")
        rows.append(f"<tr><td>{html.escape(name)}</td><td class='{'fail' if state == 'failed' else ''}'>{state}</td>"
                    f"<td>{info.get('seconds', '')}</td><td style='text-align:left'>{html.escape(str(note))}</td></tr>")
    return "".join(rows) + "</table>"


def _metrics_table(report: Any, output: str) -> str:
    keys = ["max_abs", "mean_abs", "p99_abs", "max_rel", "min_cosine", "snr_db", "nonfinite", "top1_agreement",
            "accuracy"]
    rows = ["<table><tr><th>backend</th>" + "".join(f"<th>{key}</th>" for key in keys) + "<th>budget</th></tr>"]
    for backend, metrics in report.metrics.items():
        if output not in metrics:
            continue
        data = metrics[output].to_json()
        limits = report.thresholds.get(backend, {}).get(output)
        budget = "" if not limits else f"atol {limits['atol']:.3g}" + (
            f", cos ≥ {limits['min_cosine']:.6f}" if "min_cosine" in limits else "")
        rows.append(f"<tr><td>{html.escape(backend)}</td>" + "".join(f"<td>{data.get(key, '')}</td>" for key in keys)
                    + f"<td>{html.escape(budget)}</td></tr>")
    return "".join(rows) + "</table>"


def _histogram(series: dict[str, Any]) -> str:
    """Histogram of log10 |error| per backend, as lines over shared bins."""
    samples = {name: metric.error_sample() for name, metric in series.items()}
    logs = {name: np.log10(np.maximum(values, 1e-12)) for name, values in samples.items() if values.size}
    if not logs:
        return ""
    low = min(float(v.min()) for v in logs.values())
    high = max(float(v.max()) for v in logs.values())
    high = high if high > low else low + 1
    bins = np.linspace(low, high, 41)
    counts = {name: np.histogram(values, bins)[0] / max(len(values), 1) for name, values in logs.items()}
    peak = max(float(c.max()) for c in counts.values()) or 1.0
    lines = []
    for index, count in enumerate(counts.values()):
        points = " ".join(f"{_x(i, len(count)):.1f},{_y(c / peak):.1f}" for i, c in enumerate(count))
        lines.append(f"<polyline fill='none' stroke='{COLOURS[index % len(COLOURS)]}' stroke-width='2' "
                     f"points='{points}'/>")
    return _frame("share of |error| per log10 bin", f"log10 |error| from {low:.1f} to {high:.1f}", lines, counts)


def _scatter(series: dict[str, Any]) -> str:
    """|error| against |reference| (log-log), per backend."""
    data = {name: metric.scatter_points() for name, metric in series.items()}
    data = {name: points[(points[:, 0] > 0) & (points[:, 1] > 0)] for name, points in data.items() if len(points)}
    data = {name: points for name, points in data.items() if len(points)}
    if not data:
        return ""
    logs = {name: np.log10(points) for name, points in data.items()}
    x_low = min(float(v[:, 0].min()) for v in logs.values())
    x_high = max(float(v[:, 0].max()) for v in logs.values())
    y_low = min(float(v[:, 1].min()) for v in logs.values())
    y_high = max(float(v[:, 1].max()) for v in logs.values())
    x_span, y_span = max(x_high - x_low, 1e-6), max(y_high - y_low, 1e-6)
    dots = []
    for index, values in enumerate(logs.values()):
        colour = COLOURS[index % len(COLOURS)]
        for x, y in values[:1500]:
            px = PAD + (x - x_low) / x_span * (WIDTH - 2 * PAD)
            py = HEIGHT - PAD - (y - y_low) / y_span * (HEIGHT - 2 * PAD)
            dots.append(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='1.4' fill='{colour}' fill-opacity='0.5'/>")
    caption = f"log10 |reference| {x_low:.1f}..{x_high:.1f}; log10 |error| {y_low:.1f}..{y_high:.1f}"
    return _frame("|error| vs |FP32 value|", caption, dots, logs)


def _frame(title: str, caption: str, body: list[str], legend: dict[str, Any]) -> str:
    keys = "".join(f"<text x='{PAD + 110 * i}' y='14' font-size='11' fill='{COLOURS[i % len(COLOURS)]}'>"
                   f"{html.escape(name)}</text>" for i, name in enumerate(legend))
    return (f"<figure><svg width='{WIDTH}' height='{HEIGHT}' xmlns='http://www.w3.org/2000/svg'>{keys}"
            f"<line x1='{PAD}' y1='{HEIGHT - PAD}' x2='{WIDTH - PAD}' y2='{HEIGHT - PAD}' stroke='#999'/>"
            f"<line x1='{PAD}' y1='{PAD}' x2='{PAD}' y2='{HEIGHT - PAD}' stroke='#999'/>"
            + "".join(body) + f"</svg><figcaption><b>{html.escape(title)}</b><br>{html.escape(caption)}"
            "</figcaption></figure>")


def _x(index: int, count: int) -> float:
    return PAD + index / max(count - 1, 1) * (WIDTH - 2 * PAD)


def _y(share: float) -> float:
    return HEIGHT - PAD - share * (HEIGHT - 2 * PAD) if math.isfinite(share) else HEIGHT - PAD
