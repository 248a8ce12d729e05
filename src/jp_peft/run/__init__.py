"""Running an experiment: plan, the stage entry point, local and Slurm launch, locks, status."""
