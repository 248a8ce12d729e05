"""Where jobs run: NeMo-Run executors from cluster profiles, and Slurm job states. Used by the experiment launcher and by data prepare."""
