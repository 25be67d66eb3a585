"""Experiments: the Hydra entry point, result records and paper replications."""
