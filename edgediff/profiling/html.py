"""The profiling report: per-layer latency bars, MACs vs latency per layer (inline SVG),
estimate vs measurement, op coverage per target. Self-contained HTML (edgediff.report's page
and CSS; no scripts, no network). `sections(result)` is also used by the demo's report.html.
"""

from __future__ import annotations

import html as _html
import math
from pathlib import Path
from typing import Any

from edgediff.artifact import atomic_file
from edgediff.report import bars, image, page, table


def _esc(s: Any) -> str:
    return _html.escape(str(s))


def _ops_label(op: str, keep: int = 4) -> str:
    """The slowest few op types of a layer (`op` lists them slowest first)."""
    parts = op.split("+")
    return "+".join(parts[:keep]) + (f" +{len(parts) - keep} more" if len(parts) > keep else "")


def scatter_svg(points: list[tuple[float, float, str]], xlabel: str, ylabel: str, width: int = 560, height: int = 360,
                diagonal: bool = False) -> str:
    """Log-log scatter of (x, y, label) as inline SVG; each point has a <title> tooltip.

    Points with x or y <= 0 cannot sit on a log axis: they are counted under the plot.
    """
    pts = [(x, y, lab) for x, y, lab in points if x > 0 and y > 0]
    dropped = len(points) - len(pts)
    if not pts:
        return f"<p class='muted'>no points with positive {_esc(xlabel)} and {_esc(ylabel)} to plot</p>"
    ml, mr, mt, mb = 64, 16, 12, 44
    lx = [math.log10(p[0]) for p in pts]
    ly = [math.log10(p[1]) for p in pts]
    x0, x1 = math.floor(min(lx)), math.ceil(max(lx))
    y0, y1 = math.floor(min(ly)), math.ceil(max(ly))
    if diagonal:
        x0 = y0 = min(x0, y0)
        x1 = y1 = max(x1, y1)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)

    def sx(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * (width - ml - mr)

    def sy(v: float) -> float:
        return height - mb - (v - y0) / (y1 - y0) * (height - mt - mb)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"style='background:#fff;border:1px solid #dde1e6' role='img' aria-label='{_esc(ylabel)} vs {_esc(xlabel)}'>"]
    for d in range(x0, x1 + 1):
        parts.append(f"<line x1='{sx(d):.1f}' y1='{mt}' x2='{sx(d):.1f}' y2='{height - mb}' stroke='#eef1f5'/>"
                     f"<text x='{sx(d):.1f}' y='{height - mb + 16}' font-size='11' text-anchor='middle' "
                     f"fill='#5b6472'>1e{d}</text>")
    for d in range(y0, y1 + 1):
        parts.append(f"<line x1='{ml}' y1='{sy(d):.1f}' x2='{width - mr}' y2='{sy(d):.1f}' stroke='#eef1f5'/>"
                     f"<text x='{ml - 6}' y='{sy(d) + 4:.1f}' font-size='11' text-anchor='end' fill='#5b6472'>1e{d}</text>")
    if diagonal:
        parts.append(f"<line x1='{sx(x0):.1f}' y1='{sy(y0):.1f}' x2='{sx(x1):.1f}' y2='{sy(y1):.1f}' "
                     "stroke='#b3261e' stroke-dasharray='4 3'/>")
    parts.append(f"<text x='{(ml + width - mr) / 2:.0f}' y='{height - 8}' font-size='12' text-anchor='middle'>"
                 f"{_esc(xlabel)} (log)</text>")
    parts.append(f"<text x='14' y='{(mt + height - mb) / 2:.0f}' font-size='12' text-anchor='middle' "
                 f"transform='rotate(-90 14 {(mt + height - mb) / 2:.0f})'>{_esc(ylabel)} (log)</text>")
    for (x, y, lab), a, b in zip(pts, lx, ly):
        parts.append(f"<circle cx='{sx(a):.1f}' cy='{sy(b):.1f}' r='4' fill='#4f7cff' fill-opacity='0.7'>"
                     f"<title>{_esc(lab)}: {x:,.4g} / {y:,.4g}</title></circle>")
    parts.append("</svg>")
    note = f"<p class='muted'>{dropped} layers with zero {_esc(xlabel)} or time are not plotted.</p>" if dropped else ""
    return "".join(parts) + note


def sections(result: dict[str, Any], top: int = 25) -> list[tuple[str, str]]:
    """The report sections for one profile result (measured or estimated)."""
    out: list[tuple[str, str]] = []
    layers = [la for la in result.get("layers", []) if la.get("ms") == la.get("ms")]
    est = bool(result.get("estimated"))
    kind = "ESTIMATED" if est else "measured"
    tot = result.get("total") or {}
    spread = (f", p10-p90 {tot['p10_ms']:.3f}-{tot['p90_ms']:.3f} ms over {tot.get('runs')} runs"
              if "p10_ms" in tot else "")
    summary = [["runtime", result.get("runtime")], ["total (median)" if not est else "total (estimate)",
                                                     f"{result.get('total_ms', float('nan')):.3f} ms{spread}"]]
    if result.get("layer_sum_ms") is not None:
        summary.append(["sum of per-layer times", f"{result['layer_sum_ms']:.3f} ms"])
    if result.get("peak_memory_bytes"):
        summary.append(["peak memory", f"{result['peak_memory_bytes']:,} bytes ({result.get('peak_memory_note', '')})"])
    if result.get("layer_timing"):
        summary.append(["how layers were timed", result["layer_timing"]])
    if est:
        summary.append(["note", result.get("note", "estimate")])
    out.append((f"Profile ({kind})", table(["", "value"], summary)))
    if layers:
        rows = sorted(layers, key=lambda la: -la["ms"])[:top]
        out.append((f"Per-layer latency, top {len(rows)} of {len(layers)} ({kind}, ms)",
                    bars([(f"{la['name']} ({_ops_label(la['op'])})", la["ms"]) for la in rows])))
        pts = [(float(la.get("macs", 0)), la["ms"], la["name"]) for la in layers if "macs" in la]
        if pts:
            out.append(("MACs vs latency per layer", "<p class='sub'>Compute-bound layers sit on a diagonal; layers "
                        "far above it are bound by memory or per-op cost.</p>" + scatter_svg(pts, "MACs", "ms")))
    e = result.get("estimate")
    if isinstance(e, dict) and e.get("layers"):
        meas = {la["name"]: la["ms"] for la in layers}
        pairs = [(meas[la["name"]], la["ms"], la["name"]) for la in e["layers"] if la["name"] in meas]
        cal = (e.get("calibration") or {}).get("error_on_fit_set", {})
        head = (f"<p class='sub'>{_esc(e.get('runtime'))}: estimated total {e['total_ms']:.3f} ms vs measured "
                f"{result.get('total_ms', float('nan')):.3f} ms. {_esc(e.get('note', ''))}</p>")
        if cal:
            head += table(["layers compared", "median |err| %", "time-weighted |err| %", "total err % (vs median run)",
                           "total err % (vs fastest run)", "rank corr."],
                          [[cal.get("layers_compared"), cal.get("median_abs_pct_err"), cal.get("weighted_abs_pct_err"),
                            cal.get("total_pct_err"), cal.get("total_pct_err_vs_fastest"), cal.get("spearman")]])
        out.append(("Estimate vs measurement per layer", head + scatter_svg(pairs, "measured ms", "estimated ms",
                                                                             diagonal=True)))
    cov = result.get("coverage")
    if isinstance(cov, dict):
        rows = []
        for target, c in cov.items():
            if not isinstance(c, dict):
                continue
            if c.get("applicable") is False:
                rows.append([target, "n/a", "", "", c.get("reason", "")])
                continue
            fb = ", ".join(f"{f['op']} x{f['count']}" for f in c["fallback_ops"][:6])
            rows.append([target, f"{c['ops'] - c['ops_fallback']}/{c['ops']}", f"{c['macs_share_supported']:.1%}",
                         f"{c['macs_share_fallback']:.1%}", fb + (f" ({c['note']})" if c.get("note") else "")])
        out.append(("Op coverage per target (before export)",
                    table(["target fast path", "ops supported", "MACs supported", "MACs falling back", "fallback ops"],
                          rows)))
    return out


def write_report(path: Path, result: dict[str, Any], force: bool = False,
                 grids: list[tuple[str, bytes]] | None = None) -> None:
    """Write the profile report to `path` atomically."""
    secs = sections(result)
    if grids:
        secs.append(("Samples (same seeds and sampler)",
                     "<div class='grids'>" + "".join(image(p, n) for n, p in grids) + "</div>"))
    else:
        secs.append(("Samples", "<p class='muted'>A profile has no reference model to sample against; "
                                "`edgediff demo` and `edgediff verify` produce the sample grids.</p>"))
    title = "edgediff profile" + (" (estimate)" if result.get("estimated") else "")
    src = result.get("source") if isinstance(result.get("source"), dict) else {}
    sub = f"{result.get('runtime')}" + (f" - model {src['model']} ({src.get('exported_with')})" if src else "")
    with atomic_file(Path(path), force=force) as tmp:
        tmp.write_text(page(title, sub, secs))
        tmp.chmod(0o644)  # a report is for reading: not the temp file's private 0600
