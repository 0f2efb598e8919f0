"""Rendered product packshots: the image modality of the synthetic catalog.

A packshot is a small PNG (``size`` x ``size`` pixels, default 96) drawn with PIL:

* the **container** decides the silhouette (can, bottle, box, bag, jar, tube, carton, tub, pouch,
  tray, pack),
* the **variant** decides the body colour (``data.vocab`` gives every variant an RGB colour that is
  distinct within its type group),
* the **brand** decides the label band colour and the text drawn on it,
* an **organic** product carries a green round badge in the top right corner,
* a small per-product jitter (offset, background tint) keeps images from being pixel templates.

The variant colour and the organic badge are drawn for every product, while the title omits the
variant for some products and "Organic" for some organic ones: those facts are image-only.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
_OUTLINE: RGB = (40, 40, 40)
_BADGE: RGB = (46, 160, 67)


@dataclass(frozen=True)
class Packshot:
    """Everything one image depends on (so identical inputs give identical bytes)."""

    container: str
    body_rgb: RGB
    label_rgb: RGB
    brand: str
    organic: bool
    dx: int = 0  # jitter in pixels (at 96 px), -3..3
    dy: int = 0
    background: int = 246  # grey level of the background


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _text_rgb(fill: RGB) -> RGB:
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (20, 20, 20) if luminance > 150 else (250, 250, 250)


def _silhouette(draw: ImageDraw.ImageDraw, container: str, s: float, fill: RGB) -> tuple[float, float, float, float]:
    """Draw the container body at scale ``s`` (1.0 = 96 px); return the label box (x0, y0, x1, y1)."""
    def P(*xy: float) -> list[float]:
        return [v * s for v in xy]

    kw = dict(fill=fill, outline=_OUTLINE, width=max(1, round(s)))
    if container == "can":
        draw.rounded_rectangle(P(28, 14, 68, 86), radius=6 * s, **kw)
        draw.ellipse(P(28, 10, 68, 20), fill=(200, 200, 205), outline=_OUTLINE)
        return 28, 40, 68, 60
    if container == "bottle":
        draw.rectangle(P(42, 6, 54, 14), fill=(60, 60, 60))
        draw.polygon(P(43, 14, 53, 14, 64, 32, 32, 32), **kw)
        draw.rounded_rectangle(P(32, 30, 64, 90), radius=7 * s, **kw)
        return 32, 48, 64, 70
    if container == "box":
        draw.polygon(P(18, 20, 30, 10, 80, 10, 68, 20), fill=tuple(max(0, c - 40) for c in fill), outline=_OUTLINE)
        draw.polygon(P(68, 20, 80, 10, 80, 80, 68, 90), fill=tuple(max(0, c - 60) for c in fill), outline=_OUTLINE)
        draw.rectangle(P(18, 20, 68, 90), **kw)
        return 18, 44, 68, 64
    if container == "bag":
        draw.polygon(P(24, 18, 72, 18, 78, 90, 18, 90), **kw)
        draw.line(P(24, 18, 30, 13, 36, 18, 42, 13, 48, 18, 54, 13, 60, 18, 66, 13, 72, 18), fill=_OUTLINE,
                  width=max(1, round(s)))
        return 21, 44, 75, 66
    if container == "jar":
        draw.rectangle(P(30, 12, 66, 24), fill=(70, 70, 80), outline=_OUTLINE)
        draw.rounded_rectangle(P(24, 24, 72, 88), radius=10 * s, **kw)
        return 24, 44, 72, 66
    if container == "tube":
        draw.polygon(P(22, 14, 74, 14, 58, 78, 38, 78), **kw)
        draw.rectangle(P(40, 78, 56, 90), fill=(250, 250, 250), outline=_OUTLINE)
        draw.line(P(22, 18, 74, 18), fill=_OUTLINE)
        return 27, 34, 69, 54
    if container == "carton":
        draw.polygon(P(28, 30, 48, 12, 68, 30), fill=tuple(max(0, c - 40) for c in fill), outline=_OUTLINE)
        draw.rectangle(P(44, 6, 52, 12), fill=(230, 230, 230), outline=_OUTLINE)
        draw.rectangle(P(28, 30, 68, 90), **kw)
        return 28, 50, 68, 70
    if container == "tub":
        draw.polygon(P(16, 34, 80, 34, 72, 84, 24, 84), **kw)
        draw.ellipse(P(14, 26, 82, 40), fill=(235, 235, 235), outline=_OUTLINE)
        return 19, 48, 77, 68
    if container == "pouch":
        draw.rounded_rectangle(P(22, 12, 74, 90), radius=14 * s, **kw)
        draw.ellipse(P(44, 16, 52, 24), fill=(250, 250, 250), outline=_OUTLINE)
        return 22, 42, 74, 64
    if container == "tray":
        draw.rectangle(P(8, 46, 88, 82), **kw)
        draw.rectangle(P(12, 40, 84, 48), fill=(225, 235, 240), outline=_OUTLINE)
        return 8, 54, 88, 74
    if container == "pack":
        draw.rounded_rectangle(P(12, 22, 84, 82), radius=4 * s, **kw)
        draw.line(P(12, 30, 84, 30), fill=_OUTLINE)
        return 12, 42, 84, 62
    raise ValueError(f"unknown container {container!r}")


def render(shot: Packshot, size: int = 96) -> bytes:
    """Draw ``shot`` and return PNG bytes (deterministic for equal inputs)."""
    s = size / 96.0
    img = Image.new("RGB", (size, size), (shot.background,) * 3)
    layer = Image.new("RGB", (size, size), (shot.background,) * 3)
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = _silhouette(draw, shot.container, s, shot.body_rgb)
    draw.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], fill=shot.label_rgb, outline=_OUTLINE)
    text = shot.brand
    width = (x1 - x0 - 2) * s
    for px in (max(6, round(11 * s)), max(5, round(9 * s)), max(5, round(7 * s))):
        font = _font(px)
        if draw.textlength(text, font=font) <= width:
            break
    while len(text) > 3 and draw.textlength(text, font=font) > width:
        text = text[:-1]
    draw.text(((x0 + x1) / 2 * s, (y0 + y1) / 2 * s), text, fill=_text_rgb(shot.label_rgb), font=font, anchor="mm")
    if shot.organic:
        draw.ellipse([74 * s, 4 * s, 92 * s, 22 * s], fill=_BADGE, outline=(250, 250, 250), width=max(1, round(2 * s)))
        draw.ellipse([80 * s, 10 * s, 86 * s, 16 * s], fill=(250, 250, 250))
    img.paste(layer, (round(shot.dx * s), round(shot.dy * s)))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
