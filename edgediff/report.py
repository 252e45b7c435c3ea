"""report.html: sample grids side by side and the cost/benefit table of each step.

Self-contained (inline PNGs and CSS, no scripts, no network) so it opens anywhere.
"""

from __future__ import annotations

import base64
import html
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1d2330;background:#fafbfc}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde1e6}
.sub{color:#5b6472;margin-top:0} table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem;background:#fff}
th,td{border:1px solid #dde1e6;padding:.3rem .6rem;text-align:right} th{background:#eef1f5}
td:first-child,th:first-child{text-align:left} .grids{display:flex;flex-wrap:wrap;gap:1.2rem}
figure{margin:0;background:#fff;border:1px solid #dde1e6;padding:.5rem}
figcaption{font-size:.85rem;color:#394150;margin-top:.3rem;max-width:300px}
img{image-rendering:pixelated} .bad{color:#b3261e} .ok{color:#1b6e3a} .muted{color:#7a8391}
.bar{background:#4f7cff;height:.8rem;display:inline-block;vertical-align:middle}
"""


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape("" if v is None else str(v))


def table(headers: list[str], rows: list[list[Any]], cls: list[str | None] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        c = f' class="{cls[i]}"' if cls and cls[i] else ""
        body.append(f"<tr{c}>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def image(png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode()
    cap = html.escape(caption)
    return f'<figure><img src="data:image/png;base64,{b64}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def bars(rows: list[tuple[str, float]], unit: str = "ms", width_px: int = 320) -> str:
    """Horizontal bars (e.g. per-layer latency) as an HTML table."""
    top = max((v for _, v in rows), default=1.0) or 1.0
    out = []
    for name, v in rows:
        w = int(width_px * v / top)
        out.append(f"<tr><td>{html.escape(name)}</td><td><span class='bar' style='width:{w}px'></span> {v:.3f} {unit}</td></tr>")
    return "<table>" + "".join(out) + "</table>"


def page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "\n".join(parts)
