#!/usr/bin/env bash
# Install Debian's Slurm (controller, node daemon, client) and munge, if missing. Needs root.
set -euo pipefail
need=()
for pkg in slurmctld slurmd slurm-client munge; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "slurm/local: slurmctld, slurmd, slurm-client and munge are installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "slurm/local: missing ${need[*]}; run as root: apt-get install ${need[*]}" >&2
  exit 1
fi
echo "slurm/local: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
}
echo "slurm/local: installed"
