"""Launching `braid train`: torchrun on one node, sbatch on Slurm clusters, rank discovery,
preflight checks, and `braid plan` (memory and step time of a layout, without GPUs)."""

from braid.launch.env import DistEnv, expand_nodelist, export_torch_env, torchrun_args_from_slurm

__all__ = ["DistEnv", "expand_nodelist", "export_torch_env", "torchrun_args_from_slurm"]
