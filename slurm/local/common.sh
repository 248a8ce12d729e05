# Shared by start.sh, stop.sh and status.sh (sourced): where the dev cluster lives, and which running
# daemons are its own. Every file is under $DIR; every client and daemon reads $DIR/slurm.conf.
DIR=$(realpath -m "${JP_PEFT_SLURM_DIR:-/tmp/jp-peft-slurm-dev}")
export SLURM_CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket

# The pid a daemon of this cluster wrote to PIDFILE, if that process is still the daemon this cluster
# started: its program is NAME and its command line names a file under $DIR (a recycled pid, or a
# daemon of another cluster or of the system, is not). Prints nothing otherwise.
own_pid() {
  local name=$1 pidfile=$2 pid argv
  [ -s "$pidfile" ] || return 0
  pid=$(tr -dc 0-9 < "$pidfile")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
  argv=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || return 0
  case "$(basename -- "${argv%% *}")" in "$name") ;; *) return 0 ;; esac
  case "$argv" in *" $DIR/"*|*"=$DIR/"*) echo "$pid" ;; esac
}

# NAME PIDFILE pairs of every daemon this cluster may have started.
own_daemons() {
  local f
  echo "munged $DIR/munge/munged.pid"
  echo "slurmctld $DIR/slurmctld.pid"
  for f in "$DIR"/slurmd-*.pid; do [ -e "$f" ] && echo "slurmd $f"; done
  return 0
}

# The cluster's node names, from its config (empty before the first start).
node_names() {
  [ -f "$SLURM_CONF" ] && sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$SLURM_CONF"
  return 0
}
