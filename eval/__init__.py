"""`tunevec eval`: lm-eval over a grid of variants (base, specs, tuned checkpoints) and tasks.

schema.py (the grid file's keys, pydantic) -> grid.py (expanded into variants and tasks, checked) ->
plan.py (cells, config hashes, resume; tasks.py finds lm-eval's tasks) -> runner.py (the loop) with servers.py
(a server per group; launch.py: command lines and processes), harness.py (one lm-eval run per cell, cell files)
and progress.py -> table.py and plots.py (results). commands.py is the command line; docs/eval.md the guide.
"""
