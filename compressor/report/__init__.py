"""Tables and plots for humans, from the manifest alone (so a report can be rebuilt from any bundle).

``markdown(manifest)`` -> report.md; ``html(manifest, bundle_dir)`` -> report.html, one self-contained
page (plots embedded as PNG data URIs, drawn with matplotlib's Agg backend: no display needed).
"""
from __future__ import annotations

from .manifest import LABELS, models
from .manifest import _measurement as _measurement
from .md import markdown
from .page import CSS, html
from .plots import COLORS

# _measurement is re-exported as well: benchmarks/digits_cpu.py imports it from here.
__all__ = ["COLORS", "CSS", "LABELS", "html", "markdown", "models"]
