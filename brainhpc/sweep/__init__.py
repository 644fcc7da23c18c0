"""The sweep: where and how the stages run. A jobs/*.toml file -> cells -> SLURM arrays (or
local/debug runs) -> results.

``python -m brainhpc.sweep jobs/smoke.toml`` (or ``brainhpc sweep ...``); see ``cli.py`` here.
Modules: ``config`` (sweep files) and ``resources`` (site profiles, what a task asks SLURM for);
``plan`` (every cell and its config); ``runner`` (what one array task runs: markers, signals,
requeue); one module per executor, ``slurm`` and ``local`` (local and debug); ``rundir`` (a run
directory's bookkeeping); ``status`` (the status table and the live view); ``aggregate`` (the
aggregate stage: every cell into CSVs, tables and plots).
"""
