"""Benchmarks (``ablate bench SUITE``), above everything they time; nothing in ablate imports them.

One module per suite: :mod:`.ops` (the selective-scan and conv paths), :mod:`.step` (whole
training steps), :mod:`.layers` (where a step's time goes, op by op), :mod:`.sample` (sampling
speed per paradigm), :mod:`.table` and :mod:`.report` (the results table and report at scale),
:mod:`.data` (the data pipeline). Each returns rows (dicts) with ratios against a baseline measured
in the same run, and a ``format_rows`` that prints them; the CLI stores the rows in the database.
"""
