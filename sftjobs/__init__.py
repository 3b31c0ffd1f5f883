"""sftjobs: stage profile -> plan -> rendered run directory -> Slurm/local job chain -> tracking."""

__version__ = "0.1.0"
