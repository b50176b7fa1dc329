"""The leaderboard: presets and the harness (``harness``), how one run executes locally or on Ray
(``executors``), the per-run HDF5 log (``runlog``) and the report built from it (``report``): the
paired statistics (``stats``, ``pairs``), the schedule-structure statistic against its nulls
(``structure``) and the figures (``plots``).

    python -m benchmarks.leaderboard --preset quick
    python -m benchmarks.leaderboard.report results/
"""
