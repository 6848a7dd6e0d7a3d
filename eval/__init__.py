"""`tunevec eval`: lm-eval over a grid of variants (base, specs, tuned checkpoints) and tasks.

grid.py (the grid as data) -> runner.py (one lm-eval run per cell, resumable) with launch.py (servers) ->
table.py and plots.py (results). commands.py is the command line; docs/eval.md the user's guide.
"""
