#!/usr/bin/env bash
# Exit 0 if the dev cluster answers and all its nodes can run jobs; print sinfo and squeue.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
command -v sinfo >/dev/null || { echo "slurm/local: not installed (bash slurm/local/install.sh)"; exit 1; }
[ -f "$SLURM_CONF" ] || { echo "slurm/local: not started ($SLURM_CONF does not exist)"; exit 1; }
scontrol ping 2>/dev/null | grep -q UP || { echo "slurm/local: slurmctld is not up ($SLURM_CONF)"; exit 1; }
sinfo
squeue
bad=0
for node in $(node_names); do
  state=$(sinfo -h -n "$node" -o %T 2>/dev/null)
  case "$state" in idle*|mixed*|alloc*) ;; *) echo "slurm/local: node $node is '$state'"; bad=1 ;; esac
done
exit $bad
