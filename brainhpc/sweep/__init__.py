"""The sweep: a jobs/*.toml file -> cells -> SLURM arrays (or local/debug runs) -> results.

``python -m brainhpc.sweep jobs/smoke.toml`` (or ``brainhpc sweep ...``); see ``cli.py`` here.
Modules: ``config`` (sweep files), ``cells`` (matrix expansion, what a task runs), ``submit``
(executors, arrays, dependencies, sbatch scripts), ``status``, ``external`` (the evaluate stage:
a run's models scored on external sets), ``aggregate``.
"""
