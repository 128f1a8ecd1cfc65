"""Synthetic H&E-like whole-slide images with labels driven by several independent cues.

``synthesize(cfg)`` writes a data set (pyramidal JPEG TIFFs that OpenSlide opens, tissue
masks, ``labels.csv``); ``make_slide`` renders one slide; ``tissue_mask`` regenerates a
slide's mask from its seed, ``ink_mask`` where its pen strokes (``pen``) are. See :mod:`fusedist.synth.cues` for what the labels depend on.
"""

from fusedist.synth.config import SynthConfig
from fusedist.synth.cues import CUES, make_labels, morphology, prototypes
from fusedist.synth.dataset import SlideSpec, slide_seed, slide_specs, synthesize
from fusedist.synth.fields import MASK_DOWNSAMPLE, tissue_mask
from fusedist.synth.ink import PenConfig, ink_mask
from fusedist.synth.slide import RenderOptions, SlideInfo, make_slide

__all__ = [
    "CUES", "MASK_DOWNSAMPLE", "PenConfig", "RenderOptions", "SlideInfo", "SlideSpec", "SynthConfig",
    "make_labels", "make_slide", "morphology", "prototypes", "slide_seed", "slide_specs",
    "ink_mask", "synthesize", "tissue_mask",
]
