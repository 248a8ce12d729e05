#!/usr/bin/env bash
# Stop the daemons start.sh started (slurmd, slurmctld, its own munged), by the pids they recorded
# under $JP_PEFT_SLURM_DIR, each only if it is still that daemon; anything else is left alone. Idempotent.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
stop_daemon() {  # NAME PIDFILE
  local name=$1 pidfile=$2 pid
  pid=$(own_pid "$name" "$pidfile")
  if [ -z "$pid" ]; then
    [ -s "$pidfile" ] && echo "slurm/local: $pidfile: pid $(cat "$pidfile") is not this cluster's $name; left alone"
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  if [ -d "/proc/$pid" ]; then
    kill -KILL "$pid" 2>/dev/null && echo "slurm/local: $name (pid $pid) did not stop in 10 s; killed"
  else
    echo "slurm/local: $name (pid $pid) stopped"
  fi
  rm -f "$pidfile"
}
# nodes first, then the controller, then the munged they authenticate with
while read -r name pidfile; do [ "$name" = slurmd ] && stop_daemon "$name" "$pidfile"; done < <(own_daemons)
stop_daemon slurmctld "$DIR/slurmctld.pid"
stop_daemon munged "$DIR/munge/munged.pid"
exit 0
