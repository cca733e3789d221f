"""One module per stage; each has `run(config, workdir) -> summary dict`."""

import importlib


def get(stage: str):
    """The stage module for a config's `stage` name."""
    return importlib.import_module(f"align_jax.stages.{stage}")
