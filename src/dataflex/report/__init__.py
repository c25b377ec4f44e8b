"""What a run decided, read back from the files it left: ``dataflex-cli report``.

Torch-free (a test and an import contract check it), so a run copied to a laptop can be reported
without the training stack. The kit every mode shares:

- :mod:`.reader`: the one reader of a run folder (manifest, records or lines, damaged files, the
  trace); it finds everything relative to the folder it is given, so a moved run reads as in place;
- :mod:`.rows`: the rows of the run's training set, read back from its local dataset files;
- :mod:`.text`: the text report's header and the damaged / missing lines;
- :mod:`.svg`: inline SVG charts; :mod:`.page`: the HTML page's header, loss, comparison and parts;
- :mod:`.export`: ``--export-dataset``; :mod:`.plot`: the PNG written when training ends.

What is particular to a mode lives in its report module, ``dataflex.report.modes.<mode>`` (named by
the mode table's ``report``); see :mod:`dataflex.report.modes` for what such a module provides.
"""

from __future__ import annotations

from .export import export_subset
from .plot import plot_run
from .reader import Damage, RunFolder, load_run, mode_report, read_run, read_trace
from .rows import dataset_info, source_of, source_rows
from .text import summary

__all__ = ["Damage", "RunFolder", "dataset_info", "export_subset", "load_run", "mode_report", "plot_run",
           "read_run", "read_trace", "source_of", "source_rows", "summary"]
