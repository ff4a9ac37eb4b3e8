"""The lung opacity result as a clinician reads it: burden per lung zone and opacity along the body axis.

Shared by the web page (an inline SVG chart, no script) and the PDF report (drawn with fpdf2), from the
``chest-opacity`` result's findings: ``opacity by zone`` (rows of lung, zone, percent) and ``opacity by
slice`` (``index``, ``z_mm``, ``opacity_fraction`` for every slice).
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

ZONES = ("upper", "middle", "lower")
LUNGS = ("right", "left")
MIN_SCALE = 0.1  # the chart's vertical axis reaches at least 10% opacity


def finding(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((f for f in result.get("findings", []) if f.get("name") == name), None)


def zone_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per zone (upper, middle, lower) with each lung's opacity percent (None where not measured)."""
    zones = finding(result, "opacity by zone")
    if zones is None:
        return []
    by = {(r["lung"], r["zone"]): r for r in zones.get("rows", [])}
    return [{"zone": zone, **{lung: (by[(lung, zone)]["opacity_percent"] if (lung, zone) in by else None)
                              for lung in LUNGS}} for zone in ZONES]


def profile(result: dict[str, Any]) -> list[tuple[float, float]]:
    """(z_mm, opacity fraction) of every slice, from head to feet (highest patient z first, LPS)."""
    found = finding(result, "opacity by slice")
    if found is None:
        return []
    points = [(float(s["z_mm"]), float(s["opacity_fraction"])) for s in found.get("slices", [])]
    return sorted(points, key=lambda p: -p[0])


def chart_points(points: list[tuple[float, float]], width: float, height: float) -> tuple[list[tuple[float, float]],
                                                                                             float]:
    """Points scaled into a ``width`` x ``height`` box (x from head to feet, y up), and the fraction at the top."""
    if not points:
        return [], MIN_SCALE
    top = max(MIN_SCALE, *(f for _, f in points))
    z_head, z_feet = points[0][0], points[-1][0]
    span = (z_head - z_feet) or 1.0
    return [((z_head - z) / span * width, height - f / top * height) for z, f in points], top


def profile_svg(result: dict[str, Any], _: Callable[..., str], width: int = 360, height: int = 90) -> str:
    """An inline SVG of opacity along the body axis (empty when the result has no profile)."""
    points, top = chart_points(profile(result), width, height)
    if not points:
        return ""
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    title = escape(_("Opacity along the body axis (percent of the lung on each slice)"))
    return (f'<svg class="opacity-profile" viewBox="-30 -12 {width + 40} {height + 28}" width="{width + 40}" '
            f'height="{height + 28}" role="img" aria-label="{title}"><title>{title}</title>'
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="none" stroke="#999"/>'
            f'<polyline points="{line}" fill="none" stroke="#c03000" stroke-width="1.5"/>'
            f'<text x="-4" y="4" font-size="9" text-anchor="end">{top:.0%}</text>'
            f'<text x="-4" y="{height}" font-size="9" text-anchor="end">0%</text>'
            f'<text x="0" y="{height + 12}" font-size="9">{escape(_("head"))}</text>'
            f'<text x="{width}" y="{height + 12}" font-size="9" text-anchor="end">{escape(_("feet"))}</text>'
            "</svg>")


def draw_profile(pdf: Any, result: dict[str, Any], x: float, y: float, width: float, height: float,
                 text: Callable[[str], str], _: Callable[..., str]) -> bool:
    """Draw the chart on an fpdf2 page at (x, y) mm; False when the result has no profile."""
    points, top = chart_points(profile(result), width, height)
    if not points:
        return False
    pdf.set_draw_color(150, 150, 150)
    pdf.rect(x, y, width, height)
    pdf.set_draw_color(192, 48, 0)
    pdf.polyline([(x + px, y + py) for px, py in points])
    pdf.set_draw_color(0, 0, 0)
    pdf.set_font_size(6)
    pdf.text(x - 7, y + 2, f"{top:.0%}")
    pdf.text(x - 5, y + height, "0%")
    pdf.text(x, y + height + 3, text(_("head")))
    pdf.text(x + width - 6, y + height + 3, text(_("feet")))
    return True
