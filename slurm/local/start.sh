#!/usr/bin/env bash
# Start the development Slurm cluster on this machine: its own munged, a slurmctld and one slurmd per
# node, every file (config, key, state, spool, logs, pids) under $JP_PEFT_SLURM_DIR (default
# /tmp/jp-peft-slurm-dev); nothing under /etc is written and no other daemon is touched. Idempotent.
#   bash slurm/local/start.sh             one node, named after this host
#   bash slurm/local/start.sh --nodes 2   two nodes, node1 and node2: two slurmd on this host
#   source /tmp/jp-peft-slurm-dev/env.sh  (SLURM_CONF), then: sinfo; sbatch --wrap hostname
# Ports: slurmctld $JP_PEFT_SLURM_PORT (default 6917), the nodes' slurmd the next ones (6918, 6919).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
NODES=1
case "${1:-}" in
  "") ;;
  --nodes) NODES=${2:-} ;;
  --nodes=*) NODES=${1#--nodes=} ;;
  *) echo "usage: $0 [--nodes 1|2]" >&2; exit 2 ;;
esac
case "$NODES" in 1|2) ;; *) echo "slurm/local: --nodes is 1 or 2, not '$NODES'" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "slurm/local: start.sh needs root (slurmd runs jobs as their users; munged as munge)" >&2; exit 1; }
PORT=${JP_PEFT_SLURM_PORT:-6917}
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MiB, leaving 1 GiB to the OS

# Two nodes share this host's CPUs and memory: each gets half, but at least two CPUs (a node must hold
# the two gloo ranks of the Megatron CPU tier's job; on a 2-core host the nodes overcommit its CPUs).
# Each is its own slurmd (-N NAME) on its own port; Slurm tells them apart by port on the same address.
if [ "$NODES" -eq 1 ]; then
  names=("$HOST")
  nodes_conf="NodeName=$HOST NodeAddr=$HOST Port=$((PORT + 1)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
else
  names=(node1 node2)
  per_cpus=$(( CPUS / 2 > 2 ? CPUS / 2 : 2 ))
  nodes_conf=""
  for i in 1 2; do
    nodes_conf+="NodeName=node$i NodeHostname=$HOST NodeAddr=$HOST Port=$((PORT + i)) CPUs=$per_cpus"
    nodes_conf+=" RealMemory=$((MEM / 2)) State=UNKNOWN"$'\n'
  done
  nodes_conf=${nodes_conf%$'\n'}
fi
nodelist=$(IFS=,; echo "${names[*]}")

all_own_up() {
  local name
  [ -n "$(own_pid munged "$DIR/munge/munged.pid")" ] && [ -n "$(own_pid slurmctld "$DIR/slurmctld.pid")" ] || return 1
  for name in "${names[@]}"; do [ -n "$(own_pid slurmd "$DIR/slurmd-$name.pid")" ] || return 1; done
}
mkdir -p "$DIR"
sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_PORT@|$PORT|g" -e "s|@SLURMD_PORT@|$((PORT + 1))|g" \
    -e "s|@NODELIST@|$nodelist|g" "$here/slurm.conf.in" \
  | awk -v nodes="$nodes_conf" '$0 == "@NODES@" {print nodes; next} {print}' > "$DIR/slurm.conf.new"
if cmp -s "$DIR/slurm.conf.new" "$SLURM_CONF" && all_own_up && bash "$here/status.sh" >/dev/null 2>&1; then
  rm -f "$DIR/slurm.conf.new"
  echo "slurm/local: already up (nodes $nodelist; SLURM_CONF=$SLURM_CONF; logs in $DIR)"
  exit 0
fi
# Whatever of ours is left (a half-started cluster, or one of another shape) goes first.
bash "$here/stop.sh" >/dev/null
if [ "$(node_names | paste -sd,)" != "$nodelist" ]; then
  rm -rf "$DIR/state" "$DIR/spool"  # the saved node table is another cluster's
fi
mv "$DIR/slurm.conf.new" "$SLURM_CONF"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
for name in "${names[@]}"; do mkdir -p "$DIR/spool/$name"; done
echo "# no SPANK plugins on the dev cluster (a site's /etc/slurm/plugstack.conf is not read)" > "$DIR/plugstack.conf"
echo "export SLURM_CONF=$SLURM_CONF" > "$DIR/env.sh"

# munge: this cluster's own key, socket, pid, log and seed files, the daemon as the munge user (it
# refuses root). The system's munged (/run/munge) and key (/etc/munge) are neither read nor touched.
chown munge:munge "$DIR/munge" && chmod 755 "$DIR/munge"  # munged: clients must reach the socket
runuser -u munge -- test -x "$DIR/munge" || {
  echo "slurm/local: the munge user cannot reach $DIR/munge (every directory above it must be searchable" \
       "by all); set JP_PEFT_SLURM_DIR to such a place" >&2; exit 1; }
if [ ! -s "$DIR/munge/munge.key" ]; then
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chown munge:munge "$DIR/munge/munge.key" && chmod 400 "$DIR/munge/munge.key"
fi
runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
  --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
for _ in $(seq 50); do munge -S "$MUNGE_SOCKET" -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -S "$MUNGE_SOCKET" -n >/dev/null || { echo "slurm/local: munged did not start; see $DIR/munge/munged.log" >&2; exit 1; }

slurmctld -f "$SLURM_CONF"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
for name in "${names[@]}"; do slurmd -f "$SLURM_CONF" -N "$name"; done
wait_idle() {
  local name state
  for name in "${names[@]}"; do
    state=$(sinfo -h -n "$name" -o %T 2>/dev/null || true)
    case "$state" in idle*|mixed*|alloc*) ;; *) return 1 ;; esac
  done
}
for _ in $(seq 150); do wait_idle && break; sleep 0.2; done
if ! wait_idle; then
  scontrol update nodename="$nodelist" state=resume 2>/dev/null || true; sleep 1
fi
if wait_idle; then
  echo "slurm/local: up: nodes $nodelist ($CPUS CPUs, ${MEM} MiB in all) in partition debug;" \
       "SLURM_CONF=$SLURM_CONF (source $DIR/env.sh); logs in $DIR"
else
  sinfo -N 2>&1 || true
  echo "slurm/local: nodes $nodelist not idle after 30 s; see $DIR/slurmctld.log and $DIR/slurmd-*.log" >&2
  exit 1
fi
