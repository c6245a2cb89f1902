#!/usr/bin/env bash
# Stops the loopback cluster that slurm/cluster_up.sh started, by the PIDs in
# its state folder: bash slurm/cluster_down.sh [STATE_DIR] (default /tmp/sqdist-slurm).
# Jobs still running are cancelled first so no training process outlives it.
set -uo pipefail
state=$(realpath -m "${1:-/tmp/sqdist-slurm}")
[ -d "$state" ] || { echo "cluster_down: no cluster state in $state"; exit 0; }
export SLURM_CONF=$state/slurm.conf

ctld_pid=$(cat "$state/slurmctld.pid" 2>/dev/null || true)
if [ -n "$ctld_pid" ] && kill -0 "$ctld_pid" 2>/dev/null; then
  scancel --quiet --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 40); do
    [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
    sleep 0.5
  done
fi

stop() {  # stop PIDFILE: TERM, then KILL after 10 s
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid"
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}
stop "$state/n1/slurmd.pid"
stop "$state/n2/slurmd.pid"
stop "$state/slurmctld.pid"
stop "$state/munge/munged.pid"
rm -f "$state"/n1/slurmd.pid "$state"/n2/slurmd.pid "$state"/slurmctld.pid
echo "cluster_down: stopped the cluster in $state"
