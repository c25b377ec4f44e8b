"""One report module per mode: what ``dataflex-cli report`` shows of that mode's runs.

The mode table (``dataflex.modes.TABLE``) names each module in its ``report`` field; the report kit
(:mod:`dataflex.report`) calls it and never names a mode. A module may import the kit
(``..page``, ``..svg``, ``..rows``, ``..text``), the standard library, matplotlib and numpy, never
torch. It provides:

- ``summary(run, records, top, damaged) -> list[str]``: the text report's lines after the shared
  header (``damaged``: the :class:`~dataflex.report.reader.Damage` of records that exist but cannot
  be read; a missing-steps count must not count them);
- ``sections(run, records, rows, group_by, top) -> list[str]``: the HTML page's sections after the
  header and the loss chart (``rows``: a :class:`~dataflex.report.rows.Rows` when ``ROW_TEXT``);
- ``decision_steps(run, records) -> (steps, note)``: the steps marked on the loss chart and the note
  that says what they are (``page.decided_at(steps)`` for "the component decided here");
- ``plot(plt, run, records) -> Figure``: the PNG of ``plot_loss: true`` (the table's ``plot_file``);
- ``export_refusal(run) -> str | None``: why ``--export-dataset`` cannot export this run, or None;
- ``ROW_TEXT: bool``: the page reads the run's rows back to show their text;
- ``GROUP_BY: bool``: the page accepts ``--group-by COLUMN``.

``run`` is the manifest (``run.json``) and ``records`` the step records, or the lines of the mode's
``lines`` file, sorted by step.
"""

REQUIRED = ("summary", "sections", "decision_steps", "plot", "export_refusal", "ROW_TEXT", "GROUP_BY")
