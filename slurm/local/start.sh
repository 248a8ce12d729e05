#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (munged, slurmctld, slurmd); idempotent.
#   bash slurm/local/start.sh          then: sinfo; sbatch --wrap 'hostname'
# Runtime files go to $JP_PEFT_SLURM_DIR (default /tmp/jp-peft-slurm); the config is written to
# /etc/slurm/slurm.conf, where Debian's binaries look for it, with a copy in the runtime dir.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
DIR=${JP_PEFT_SLURM_DIR:-/tmp/jp-peft-slurm}
HOST=$(hostname -s)

if bash "$here/status.sh" >/dev/null 2>&1; then
  echo "slurm/local: already up ($HOST, config /etc/slurm/slurm.conf, logs $DIR)"
  exit 0
fi
mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MiB, leaving 1 GiB to the OS
sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM@|$MEM|g" \
  "$here/slurm.conf.in" > "$DIR/slurm.conf"
cp "$DIR/slurm.conf" /etc/slurm/slurm.conf
echo "export SLURM_CONF=/etc/slurm/slurm.conf" > "$DIR/env.sh"

# munge: a key once, then the daemon as the munge user (it refuses to run as root)
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/started-munged"
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done

pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
sleep 0.5
slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
slurmd
for _ in $(seq 150); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
  case "$state" in idle*|mixed*|alloc*) break ;; esac
  sleep 0.2
done
case "$state" in
  idle*|mixed*|alloc*) ;;
  *) scontrol update nodename="$HOST" state=resume 2>/dev/null || true; sleep 1
     state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true) ;;
esac
case "$state" in
  idle*|mixed*|alloc*) echo "slurm/local: up: node $HOST ($CPUS CPUs, ${MEM} MiB) in partition debug; logs in $DIR" ;;
  *) echo "slurm/local: node $HOST is '$state' after 30 s; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2; exit 1 ;;
esac
