"""Minimal PNG charts with Pillow (matplotlib is not in the venv): line series and a histogram."""
from __future__ import annotations

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
W, H, L, R, T, B = 800, 500, 70, 20, 40, 50


def _frame(title: str, xlabel: str, ylabel: str, x0, x1, y0, y1):
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.text((L, 10), title, fill="black")
    d.text(((W - len(xlabel) * 6) // 2, H - 18), xlabel, fill="black")
    d.text((4, T - 14), ylabel, fill="black")
    for i in range(6):
        fx = x0 + (x1 - x0) * i / 5
        px = L + (W - L - R) * i / 5
        d.line([px, H - B, px, H - B + 4], fill="black")
        d.text((px - 12, H - B + 6), f"{fx:.4g}", fill="black")
        fy = y0 + (y1 - y0) * i / 5
        py = H - B - (H - T - B) * i / 5
        d.line([L - 4, py, L, py], fill="black")
        d.text((4, py - 5), f"{fy:.4g}", fill="black")

    def to_px(x, y):
        return (L + (W - L - R) * (x - x0) / max(x1 - x0, 1e-12), H - B - (H - T - B) * (y - y0) / max(y1 - y0, 1e-12))
    return img, d, to_px


def line_chart(path, series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> None:
    pts = [p for s in series.values() for p in s] or [(0.0, 0.0), (1.0, 1.0)]
    x0, x1 = 0.0, max(x for x, _ in pts) or 1.0
    y0, y1 = min(y for _, y in pts), max(y for _, y in pts)
    pad = (y1 - y0) * 0.1 or 0.05
    img, d, to_px = _frame(title, xlabel, ylabel, x0, x1, y0 - pad, y1 + pad)
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        px = [to_px(x, y) for x, y in s]
        if len(px) > 1:
            d.line(px, fill=c, width=2)
        for x, y in px:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.text((W - R - 170, T + 8 + 14 * i), f"- {name}", fill=c)
    img.save(path)


def histogram(path, values: list[float], bins: int, lo: float, hi: float, title: str, xlabel: str,
              marks: dict[str, float] | None = None) -> None:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    img, d, to_px = _frame(title, xlabel, "count", lo, hi, 0, max(counts) * 1.05 or 1)
    for i, c in enumerate(counts):
        a, b = to_px(lo + (hi - lo) * i / bins, 0), to_px(lo + (hi - lo) * (i + 1) / bins, c)
        d.rectangle([a[0], b[1], b[0] - 1, a[1]], fill=COLORS[0])
    for j, (name, x) in enumerate((marks or {}).items()):
        px = to_px(x, 0)[0]
        d.line([px, T, px, H - B], fill=COLORS[1], width=1)
        d.text((px + 3, T + 4 + 12 * j), f"{name}={x:g}", fill=COLORS[1])
    img.save(path)
