"""HTML building blocks: one page shell with inline CSS and JS, shaded tokens, and inline SVG charts.

Everything a page needs is inside it: no scripts, styles, fonts or images are fetched, so a page
opens from disk and makes no network request. The only outside URLs are Neuronpedia anchor links.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header{background:#1d2733;color:#fff;padding:12px 24px}header a{color:#9cd1ff}
header h1{font-size:19px;margin:0}header .sub{color:#b9c4cf;font-size:13px}
main{padding:14px 24px;max-width:1280px}
section{background:#fff;border:1px solid #dfe3e8;border-radius:6px;padding:12px 16px;margin:0 0 14px}
h2{font-size:16px;margin:0 0 8px}h3{font-size:14px;margin:10px 0 4px;color:#3a4653}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;text-align:right;border-bottom:1px solid #eceff3}
th{background:#eef1f5;position:sticky;top:0;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.l,th.l{text-align:left}
.stats{display:flex;flex-wrap:wrap;gap:8px 22px}.stats b{font-variant-numeric:tabular-nums}
.ex{display:flex;gap:10px;align-items:baseline;padding:3px 0;border-bottom:1px solid #f0f2f5}
.ex .v{min-width:74px;text-align:right;font-weight:600;font-variant-numeric:tabular-nums}
.ex .where{min-width:118px;white-space:nowrap;color:#7a8591;font-size:12px}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;word-break:break-word}
.t{border-radius:2px;padding:0 0.5px}.t.f{outline:2px solid #1d2733;font-weight:700}
.t.nv{color:#9aa4ae}
.cols{display:flex;gap:24px;flex-wrap:wrap}
.muted{color:#7a8591}.warn{color:#a33}
input{font:inherit;padding:3px 6px;border:1px solid #c5ccd4;border-radius:4px}input[type=number]{width:7em}
.controls{display:flex;gap:16px;align-items:center;margin-bottom:8px;flex-wrap:wrap}
.scroll{max-height:520px;overflow:auto;border:1px solid #eceff3}
svg text{font:11px system-ui,sans-serif;fill:#3a4653}
a{color:#0b63b6}
"""


JS_FORMAT = r"""
function fmt(v, digits){
  if (v === null || isNaN(v)) return 'n/a';
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < Math.pow(10, -digits))) return v.toPrecision(digits);
  return v.toFixed(digits);
}
function escHtml(s){return String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'})[c]);}
"""
"""The pages' scripts format numbers as `number` does (``fmt``) and escape text as `esc` does (``escHtml``)."""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def number(value: float | None, digits: int = 3) -> str:
    """A short display form; the exact value goes in a ``data-v`` attribute."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** (-digits)):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


def page(title: str, subtitle: str, body: str, script: str = "") -> str:
    """A whole self-contained page."""
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><div class=sub>{subtitle}</div></header>"
        f"<main>{body}</main>" + (f"<script>{script}</script>" if script else "") + "</body></html>"
    )


def shade(value: float | None, scale: float) -> str:
    """Background colour for an activation: orange for positive, blue for negative, by |value| / scale."""
    if value is None or not math.isfinite(value) or scale <= 0:
        return "transparent"
    alpha = min(abs(value) / scale, 1.0) * 0.85
    return f"rgba(255,120,0,{alpha:.3f})" if value > 0 else f"rgba(40,110,255,{alpha:.3f})"


def visible(token: str) -> str:
    """Token text with newlines and tabs made visible (the page keeps whitespace)."""
    return token.replace("\n", "\u23ce").replace("\t", "\u21e5")


def tokens_html(tokens: Sequence[str], values: Sequence[float | None], scale: float, focus: int | None = None) -> str:
    """One ``<span class=t>`` per token, shaded by its activation, the value on hover and in ``data-v``."""
    spans = []
    for i, (token, value) in enumerate(zip(tokens, values)):
        classes = "t" + (" f" if i == focus else "") + (" nv" if value is None else "")
        data = f" data-v='{value!r}'" if value is not None else ""
        hover = f"{token!r}: {number(value, 4)}" if value is not None else f"{token!r}: not fed back (no activation)"
        spans.append(
            f"<span class='{classes}'{data} style='background:{shade(value, scale)}' title='{esc(hover)}'>{esc(visible(token))}</span>"
        )
    return "<span class=ctx>" + "".join(spans) + "</span>"


def symlog(value: float) -> float:
    """``sign(v) * log10(1 + |v|)``: keeps 0.003, 19.8 and -300 apart on one axis."""
    return math.copysign(math.log10(1.0 + abs(value)), value)


SYMLOG_NOTE = "symmetric log scale: bar length sign(v)·log10(1 + |v|); the value is printed beside each bar"


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    width: int = 560,
    reference: tuple[str, float] | None = None,
    log_scale: bool = False,
) -> str:
    """Horizontal bars around a zero line; an optional dashed reference value (e.g. the neuron's maximum).
    ``log_scale`` draws lengths on the `symlog` scale, so a control of -300 does not squash a bar of 20;
    say so beside the chart (`SYMLOG_NOTE`)."""
    row, left, pad = 24, 170, 60
    f = symlog if log_scale else float
    extent = [0.0, *(f(v) for v in values)] + ([f(reference[1])] if reference else [])
    low, high = min(extent), max(extent)
    span = (high - low) or 1.0
    x = lambda v: left + pad + (f(v) - low) / span * (width - left - 2 * pad)  # noqa: E731  (room for value labels)
    height = row * len(values) + 30
    parts = [f"<svg width={width} height={height} role=img>"]
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 6 + i * row
        x0, x1 = sorted((x(0.0), x(value)))
        colour = "#ff7800" if value >= 0 else "#286eff"
        parts.append(
            f"<text x={left - 8} y={y + 14} text-anchor=end>{esc(label)}</text>"
            f"<rect class=bar data-v='{value!r}' x={x0:.1f} y={y} width={max(x1 - x0, 1):.1f} height={row - 8} fill='{colour}'>"
            f"<title>{esc(label)}: {number(value, 4)}</title></rect>"
            f"<text x={x1 + 4 if value >= 0 else x0 - 4:.1f} y={y + 14} text-anchor={'start' if value >= 0 else 'end'}>{number(value)}</text>"
        )
    parts.append(f"<line x1={x(0):.1f} x2={x(0):.1f} y1=0 y2={height - 20} stroke='#333'/>")
    if reference:
        parts.append(
            f"<line x1={x(reference[1]):.1f} x2={x(reference[1]):.1f} y1=0 y2={height - 20} stroke='#a33' stroke-dasharray='4 3'/>"
            f"<text x={x(reference[1]):.1f} y={height - 6} text-anchor=middle fill='#a33'>{esc(reference[0])} {number(reference[1])}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(
    counts: Sequence[int], low: Sequence[float], high: Sequence[float], *, width: int = 900, height: int = 170
) -> str:
    """Bars for the occupied range of a fixed-bin histogram; heights on a log scale (bins span decades)."""
    occupied = [i for i, c in enumerate(counts) if c]
    if not occupied:
        return "<p class=muted>no counted activations</p>"
    first, last = occupied[0], occupied[-1]
    shown = list(range(first, last + 1))
    bar = (width - 40) / len(shown)
    top = math.log1p(max(counts))
    parts = [f"<svg width={width} height={height + 34} role=img>"]
    for j, i in enumerate(shown):
        h = (height - 10) * math.log1p(counts[i]) / top
        colour = "#ff7800" if low[i] >= 0 else ("#286eff" if high[i] <= 0 else "#8a96a3")
        parts.append(
            f"<rect class=hbar data-count={counts[i]} x={30 + j * bar:.1f} y={height - h:.1f} width={max(bar - 1, 1):.1f} "
            f"height={h:.1f} fill='{colour}'><title>[{number(low[i], 4)}, {number(high[i], 4)}): {counts[i]}</title></rect>"
        )
    for j in range(0, len(shown), max(1, len(shown) // 6)):
        i = shown[j]
        edge = 0.0 if low[i] < 0 < high[i] else (low[i] if low[i] >= 0 else high[i])  # the edge nearer zero
        parts.append(f"<line x1={30 + j * bar:.1f} x2={30 + j * bar:.1f} y1={height} y2={height + 4} stroke='#333'/>")
        parts.append(f"<text x={30 + j * bar:.1f} y={height + 16} text-anchor=middle>{edge:.3g}</text>")
    parts.append(f"<text x=30 y={height + 30} class=muted>activation (log-spaced bins; bar height: log count)</text></svg>")
    return "".join(parts)


def scatter_chart(
    points: Sequence[tuple[float, float, str, str | None]], *, x_label: str, y_label: str, width: int = 620, height: int = 300
) -> str:
    """Points ``(x, y, tooltip, link)``; x on a log scale (densities span decades)."""
    positive = [p[0] for p in points if p[0] > 0]
    floor = min(positive) if positive else 1e-6  # neurons that never fire sit at the left edge
    xs = [max(p[0], floor) for p in points]
    ys = [p[1] for p in points]
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = min(ys + [0.0]), max(ys + [0.0])
    sx = lambda v: 50 + (math.log10(max(v, floor)) - lx0) / ((lx1 - lx0) or 1) * (width - 70)  # noqa: E731
    sy = lambda v: height - 30 - (v - y0) / ((y1 - y0) or 1) * (height - 50)  # noqa: E731
    parts = [
        f"<svg width={width} height={height} role=img><rect x=50 y=10 width={width - 70} height={height - 40} fill='#fafbfc' stroke='#dfe3e8'/>"
    ]
    for x, y, tip, link in points:
        colour = "#d35400" if link else "#7f8c99"
        dot = f"<circle cx={sx(x):.1f} cy={sy(y):.1f} r={3.5 if link else 2} fill='{colour}' fill-opacity=0.7><title>{esc(tip)}</title></circle>"
        parts.append(f"<a href='{esc(link)}'>{dot}</a>" if link else dot)
    parts.append(
        f"<text x={width / 2:.0f} y={height - 4} text-anchor=middle>{esc(x_label)} (log scale, {number(10**lx0, 2)} to {number(10**lx1, 2)})</text>"
        f"<text x=12 y={height / 2:.0f} transform='rotate(-90 12 {height / 2:.0f})' text-anchor=middle>{esc(y_label)}</text>"
        f"<text x=46 y={sy(y1) + 4:.1f} text-anchor=end>{number(y1, 2)}</text><text x=46 y={sy(y0):.1f} text-anchor=end>{number(y0, 2)}</text></svg>"
    )
    return "".join(parts)
