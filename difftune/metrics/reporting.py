"""Result files people read: JSON, markdown and CSV tables, image grids and scatter plots (PNG).

Plots are drawn with PIL so evaluation needs no plotting library. Every file is written
atomically (temporary file, then rename), so an interrupted run never leaves half a table.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..io import write_text

Row = Mapping[str, Any]


# ---------------------------------------------------------------- tables

def format_value(value: Any, precision: int = 3) -> str:
    """Numbers for tables: floats to ``precision`` significant decimals, big ints with separators."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and abs(value) >= 1000:
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 10**-precision:  # a learning rate of 3e-4 is not "0.000"
            return f"{value:.{precision}g}"
        return f"{value:.{precision}f}"
    return str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[str], headers: Mapping[str, str] | None = None,
                   precision: Mapping[str, int] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts) over ``columns``; missing values show as –."""
    headers = headers or {}
    precision = precision or {}
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [format_value(row.get(c), precision.get(c, 3)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, rows: Sequence[Row], columns: Sequence[str]) -> Path:
    """Raw values (full precision), one row per dict; missing values are empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return write_text(path, buffer.getvalue())


# ---------------------------------------------------------------- images

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


# Pillow's built-in font has no arrows or minus sign; plot labels spell them out.
_PLAIN_GLYPHS = {"↓": "(lower is better)", "↑": "(higher is better)", "−": "-"}


def _plain_text(text: str) -> str:
    for glyph, plain in _PLAIN_GLYPHS.items():
        text = text.replace(glyph, plain)
    return text


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Cut ``text`` with an ellipsis so it fits ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def image_grid(images: Sequence[Image.Image], columns: int, row_captions: Sequence[str] | None = None,
               padding: int = 2, cell_size: int | None = None) -> Image.Image:
    """Images in a grid, row by row; an optional caption strip above each row.

    ``cell_size`` upsamples small images (nearest neighbour) so 64-px samples stay visible.
    """
    if not images:
        raise ValueError("no images for the grid")
    rows = math.ceil(len(images) / columns)
    if row_captions is not None and len(row_captions) != rows:
        raise ValueError(f"{len(row_captions)} row captions for {rows} rows")
    width, height = images[0].size
    if cell_size:
        scale = cell_size / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    font = _font(12)
    strip = 16 if row_captions is not None else 0
    grid_w = columns * width + (columns + 1) * padding
    grid = Image.new("RGB", (grid_w, rows * (height + strip + padding) + padding), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        top = padding + row * (height + strip + padding)
        if col == 0 and row_captions is not None:
            draw.text((padding, top + 1), _fit(draw, row_captions[row], font, grid_w - 2 * padding),
                      fill="black", font=font)
        cell = image.convert("RGB")
        if cell.size != (width, height):
            cell = cell.resize((width, height), Image.NEAREST)
        grid.paste(cell, (padding + col * (width + padding), top + strip))
    return grid




# ---------------------------------------------------------------- plots

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 × 10^k)."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _log_ticks(low: float, high: float) -> list[float]:
    ticks = []
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**exponent
            if low <= value <= high:
                ticks.append(value)
    if len(ticks) > 8:
        ticks = [t for t in ticks if f"{t:e}".startswith("1")]
    return ticks or [low, high]


def _tick_label(value: float) -> str:
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        exponent = math.floor(math.log10(abs(value)))
        mantissa = value / 10**exponent
        return f"{mantissa:g}e{exponent}"
    return f"{value:g}"


Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels


def scatter_plot(points: Sequence[tuple[float, float, str]], x_label: str, y_label: str, title: str = "",
                 log_x: bool = False, size: tuple[int, int] = (640, 460),
                 colors: Mapping[str, str] | None = None, connect: bool = False) -> Image.Image:
    """A labelled scatter plot: one coloured, named point per (x, y, label); None values are skipped.

    ``colors`` maps labels to colours (so a method keeps its colour across plots); other
    labels take the palette in order. ``connect``: the points of one label are a curve (in
    the given order, e.g. over training checkpoints), joined by lines and named at its end.
    """
    points = [(float(x), float(y), label) for x, y, label in points
              if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if log_x and any(x <= 0 for x, _, _ in points):
        raise ValueError("a log x axis needs positive x values")
    x_label, y_label, title = _plain_text(x_label), _plain_text(y_label), _plain_text(title)
    width, height = size
    left, right, top, bottom = 78, 24, 40, 56
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(12)
    draw.text((left, 12), title, fill="black", font=font)
    plot = (left, top, width - right, height - bottom)
    draw.rectangle(plot, outline="black")
    draw.text(((plot[0] + plot[2]) // 2 - _text_width(draw, x_label, font) // 2, height - 22), x_label,
              fill="black", font=font)
    y_title = Image.new("RGBA", (_text_width(draw, y_label, font) + 4, 18), (255, 255, 255, 0))
    ImageDraw.Draw(y_title).text((2, 0), y_label, fill="black", font=font)
    y_title = y_title.rotate(90, expand=True)
    image.paste(y_title, (4, (plot[1] + plot[3]) // 2 - y_title.size[1] // 2), y_title)
    if not points:
        draw.text((plot[0] + 10, plot[1] + 10), "no data", fill="gray", font=font)
        return image

    def span(values: list[float], log: bool) -> tuple[float, float]:
        values = [math.log10(v) for v in values] if log else values
        low, high = min(values), max(values)
        pad = (high - low) * 0.12 or (abs(high) * 0.1 or 1.0)
        low, high = low - pad, high + pad
        return (10**low, 10**high) if log else (low, high)

    x_low, x_high = span([p[0] for p in points], log_x)
    y_low, y_high = span([p[1] for p in points], False)

    def to_px(x: float, y: float) -> tuple[float, float]:
        if log_x:
            fx = (math.log10(x) - math.log10(x_low)) / (math.log10(x_high) - math.log10(x_low))
        else:
            fx = (x - x_low) / (x_high - x_low)
        fy = (y - y_low) / (y_high - y_low)
        return plot[0] + fx * (plot[2] - plot[0]), plot[3] - fy * (plot[3] - plot[1])

    for tick in _log_ticks(x_low, x_high) if log_x else _nice_ticks(x_low, x_high):
        px, _ = to_px(tick, y_low)
        draw.line([(px, plot[3]), (px, plot[3] + 5)], fill="black")
        draw.line([(px, plot[1]), (px, plot[3])], fill="#e6e6e6")
        label = _tick_label(tick)
        draw.text((px - _text_width(draw, label, small) / 2, plot[3] + 8), label, fill="black", font=small)
    for tick in _nice_ticks(y_low, y_high):
        _, py = to_px(x_low, tick)
        draw.line([(plot[0] - 5, py), (plot[0], py)], fill="black")
        draw.line([(plot[0], py), (plot[2], py)], fill="#e6e6e6")
        label = _tick_label(tick)
        draw.text((plot[0] - 8 - _text_width(draw, label, small), py - 7), label, fill="black", font=small)
    draw.rectangle(plot, outline="black")
    labels = list(dict.fromkeys(label for _, _, label in points))
    last_of = {label: max(i for i, p in enumerate(points) if p[2] == label) for label in labels}

    def color_of(index: int, label: str) -> str:
        palette_index = labels.index(label) if connect else index
        return (colors or {}).get(label, PALETTE[palette_index % len(PALETTE)])

    if connect:
        for label in labels:
            curve = [to_px(x, y) for x, y, name in points if name == label]
            if len(curve) > 1:
                draw.line(curve, fill=color_of(0, label), width=2)
    named, markers = [], []  # the points that carry a label; every marker, which labels keep clear of
    for index, (x, y, label) in enumerate(points):
        px, py = to_px(x, y)
        color = color_of(index, label)
        radius = 5 if not connect or index == last_of[label] else 3
        draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=color, outline="black")
        markers.append((px - 5, py - 5, px + 5, py + 5))
        if not connect or index == last_of[label]:
            named.append(((px, py), label, color))
    sizes = [(_text_width(draw, label, small), 14) for _, label, _ in named]
    corners = place_labels([a for a, _, _ in named], sizes, plot, markers)
    for (text_x, text_y), (_, label, color) in zip(corners, named, strict=True):
        draw.text((text_x, text_y), label, fill=color, font=small)
    return image


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], bounds: Box,
                 obstacles: Sequence[Box] = ()) -> list[tuple[float, float]]:
    """Top-left corners of point labels: right of and above each point, moved down or up a line (then to
    the point's left) where it would cover a label placed before it or an obstacle (the plot's markers),
    so crowded plots stay readable."""
    left, top, right, bottom = bounds
    placed: list[Box] = list(obstacles)
    corners = []
    for (px, py), (width, height) in zip(anchors, sizes, strict=True):
        beside = px + 8 if px + 8 + width < right else px - 8 - width
        other = px - 8 - width if beside > px and px - 8 - width > left else beside
        boxes = [(x, y, x + width, y + height) for x in dict.fromkeys((beside, other))
                 for y in (py - 16 + shift for shift in (0, height, -height, 2 * height, -2 * height))]
        box = next((b for b in boxes if top <= b[1] and b[3] <= bottom and not _covers_any(b, placed)),
                   boxes[0])
        placed.append(box)
        corners.append(box[:2])
    return corners


def _covers_any(box: Box, others: Sequence[Box]) -> bool:
    x, y, x2, y2 = box
    return any(x < a2 and a < x2 and y < b2 and b < y2 for a, b, a2, b2 in others)
