"""Batch runs: circuits and dashboards over a dataset, sharded, resumable, locally or on a Ray cluster.

1. A *job file* is JSONL, one job per line (``jobs.py``): ``{"id", "kind": "trace" | "dashboard", ...}``.
   ``make_jobs`` writes one from a text source (a folder of files, a ``datasets`` dataset, the mini suite's
   held-out files) and a target rule (e.g. every position where a feature fires).
2. A *worker* (``worker.py``) loads the suite once, runs jobs one after another and writes each job's result
   as one file ``OUT/results/<id>.json`` by rename, so a result is either whole or absent.
3. The *runner* (``runner.py``) reads the job file, keeps this shard's jobs (``--shard K/N``), skips those
   whose result is already there and belongs to the same job, and hands the rest to a backend: ``local``
   (one worker in this process) or ``ray`` (``ray_backend.py``: one worker actor per GPU, or per CPU slot).
   A kill at any moment loses at most the jobs in flight; the rerun redoes exactly those.
4. ``summarize.py`` merges the results: feature frequency and mean attribution per target, a plotly page,
   and an index of the dashboards.

Usage and measured numbers: ``docs/batch.md``.
"""
