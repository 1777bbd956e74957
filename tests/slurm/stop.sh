#!/usr/bin/env bash
# Stop what tests/slurm/start.sh started: cancel jobs, then slurmd, slurmctld and munged
# (munged only if start.sh started it), each by its own pid.
#   tests/slurm/stop.sh [STATE_DIR]     (default /tmp/shardtune-slurm)
set -uo pipefail

STATE=${1:-/tmp/shardtune-slurm}
export SLURM_CONF=$STATE/slurm.conf
[ -f "$SLURM_CONF" ] || exit 0

stop_pid() { # stop_pid NAME PID
    local name=$1 pid=$2
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid"
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    echo "$name ($pid) did not stop: killing it" >&2
    kill -9 "$pid" 2>/dev/null
}

scancel --full --quiet --partition=debug 2>/dev/null
sleep 1
for daemon in slurmd slurmctld; do
    [ -f "$STATE/$daemon.pid" ] && stop_pid "$daemon" "$(cat "$STATE/$daemon.pid")"
done
if [ -f "$STATE/munged.started" ]; then
    pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
    [ -n "$pid" ] && stop_pid munged "$pid"
    rm -f "$STATE/munged.started"
fi
exit 0
