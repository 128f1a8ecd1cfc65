"""Pen marks on a thumbnail: pixels that Otsu on saturation would call tissue but are ink.

Pathologists mark slides with felt-tip pens (blue, green, black; red less often). Coloured ink
is as saturated as stain, so Otsu keeps it. H&E, though, has a narrow hue range: eosin pink
and hematoxylin purple, hue ~255-360° (0-255 on Pillow's scale, 180-255), and tissue on a
thumbnail is never very dark and grey at once. The rule, per thumbnail pixel in HSV:

* coloured pen: the hue lies in the pen's band (:data:`PEN_HUES`) and the saturation is at
  least ``min_saturation`` (glass is grey, and has any hue);
* black pen: darker than ``black_max_value`` and greyer than ``black_max_saturation`` (dark
  tissue, such as a cluster of nuclei, is dark *purple*, i.e. saturated).

The ink found is grown by ``margin_um``: a stroke's soft edge blends ink with stain into
purple, which the hue rule cannot tell from tissue. This is histolab's idea (its pen filters
threshold R, G and B per pen colour) written as hue bands, which need one threshold per pen.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fusedist.config import StrictModel

Pen = Literal["blue", "green", "red", "black"]

PEN_HUES: dict[str, tuple[float, float]] = {
    # Degrees, [start, end); a band may wrap through 0°. H&E spans ~255-360°.
    "blue": (180.0, 250.0),   # blue markers; stops short of hematoxylin's blue-purple
    "green": (70.0, 180.0),   # no stain is green
    "red": (350.0, 20.0),     # next to eosin (~320-350°): off by default
}


class InkConfig(StrictModel):
    """Pen marks excluded from tissue (on by default; ``enabled: false`` gives the masks of
    fusedist before ink removal, bit for bit)."""

    enabled: bool = True
    """Find pen marks on the thumbnail and remove them from the tissue mask."""

    pens: list[Pen] = Field(default_factory=lambda: ["blue", "green", "black"])
    """Pen colours to look for. ``red`` is off by default: its hue band borders eosin's, so
    turn it on only for cohorts marked in red whose stain is not orange-red."""

    min_saturation: int = Field(50, ge=0, le=255)
    """Coloured pens: the least saturation (0-255) of an ink pixel; greyer pixels are glass."""

    black_max_value: int = Field(90, ge=0, le=255)
    """Black pen: pixels darker than this brightness (0-255) ..."""

    black_max_saturation: int = Field(128, ge=0, le=255)
    """... and greyer than this saturation (0-255) are ink (dark tissue is saturated)."""

    margin_um: float = Field(24.0, ge=0.0)
    """Ink is grown by this radius (µm): the blurred edge of a stroke mixes ink and stain."""



def in_hue_band(hue_deg: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Whether each hue (degrees) is in ``[start, end)``, a band that may wrap through 0°."""
    lo, hi = band
    return (hue_deg >= lo) & (hue_deg < hi) if lo <= hi else (hue_deg >= lo) | (hue_deg < hi)


def ink_pixels(hsv: np.ndarray, cfg: InkConfig) -> np.ndarray:
    """Boolean (H, W): pixels of a Pillow HSV image (uint8 H, S, V) that look like pen ink."""
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    sat, val = hsv[..., 1], hsv[..., 2]
    ink = np.zeros(hsv.shape[:2], bool)
    coloured = sat >= cfg.min_saturation
    for pen in cfg.pens:
        if pen == "black":
            ink |= (val < cfg.black_max_value) & (sat < cfg.black_max_saturation)
        else:
            ink |= coloured & in_hue_band(hue, PEN_HUES[pen])
    return ink
