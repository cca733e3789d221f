"""The fit planner: whether a stage's train step fits a TPU slice's HBM, compiled ahead of time on a CPU.

topology.py  the slices (chips, HBM, peak FLOP/s) and their compile-only devices (libtpu)
mesh.py      the preset's mesh, or the preset's rescaled to the slice's chips
memory.py    XLA's per-chip memory analysis, the state's bytes from shapes, the verdict, GRPO's KV cache
search.py    the least remat, then the fewest microbatches, that fit
planner.py   one plan: compiles the settings, gathers the numbers
report.py    the plan as lines and as a markdown table row
architectures.py  the real-model presets' config.json shapes, for planning without their weights

The step compiled is the stage's own, from align_jax/stages/plan.py; launch/plan.py is the command.
"""
