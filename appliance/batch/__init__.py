"""Screening an archive: every series under a folder tree, analysed as the appliance analyses a received one.

:mod:`discover` imports the archive into the run's own data directory and lists one task per series;
:mod:`task` screens one series in a worker (its own scratch data directory, the job runner, no PACS);
:mod:`pool` runs tasks in local worker processes, :mod:`cluster` on a Ray cluster; :mod:`results` keeps one
record per series and writes the results table and the HTML summary; :mod:`screen` ties them together.
"""
