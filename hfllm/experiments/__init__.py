"""Experiments made of many pretraining runs in one process: `hfllm ablate` (ablate.py: one axis at a time, at
equal compute) and `hfllm scaling` (scaling.py: a size x tokens grid, its checks and the fitted scaling law, fit.py).
points.py resolves, keys, trains and keeps each run; plots.py draws the figures (docs/experiments.md)."""
