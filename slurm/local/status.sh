#!/usr/bin/env bash
# Exit 0 if the local cluster answers and its node can run jobs; print sinfo and squeue.
set -uo pipefail
command -v sinfo >/dev/null || { echo "slurm/local: not installed (bash slurm/local/install.sh)"; exit 1; }
scontrol ping 2>/dev/null | grep -q UP || { echo "slurm/local: slurmctld is not up"; exit 1; }
sinfo
squeue
state=$(sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null)
case "$state" in idle*|mixed*|alloc*) exit 0 ;; *) echo "slurm/local: node state '$state'"; exit 1 ;; esac
