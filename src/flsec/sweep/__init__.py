"""``flsec sweep``: a grid of experiments as ordinary run directories, aggregated over seeds.

The grid (``[grid]`` of quoted dotted config paths -> lists) expands to cells (:mod:`.grid`); every
(cell, seed) is trained as a normal, resumable run (:mod:`.runs`, :mod:`.runner`); the results become a CSV, a
mean +/- std summary, heatmaps and an HTML index (:mod:`.outputs`). A sweep never changes how a single
run works.
"""

from flsec.sweep.grid import Axis, Cell, expand
from flsec.sweep.runner import run_sweep
from flsec.sweep.runs import Run, SweepResult

__all__ = ["Axis", "Cell", "Run", "SweepResult", "expand", "run_sweep"]
