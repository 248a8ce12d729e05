#!/usr/bin/env bash
# Stop the local cluster (slurmd, slurmctld, and munged if start.sh started it); idempotent.
DIR=${JP_PEFT_SLURM_DIR:-/tmp/jp-peft-slurm}
pkill -x slurmd 2>/dev/null && echo "slurm/local: slurmd stopped"
pkill -x slurmctld 2>/dev/null && echo "slurm/local: slurmctld stopped"
if [ -f "$DIR/started-munged" ]; then
  pkill -x munged 2>/dev/null && echo "slurm/local: munged stopped"
  rm -f "$DIR/started-munged"
fi
exit 0
