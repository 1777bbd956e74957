#!/usr/bin/env bash
# Stop what tests/slurm/start.sh started: cancel the jobs, end what is left of them, then
# stop the slurmd daemons, slurmctld and munged (munged only if start.sh started it), each by its pid.
#   tests/slurm/stop.sh [--jobs-only] [STATE_DIR]     (default /tmp/shardtune-slurm)
# --jobs-only: cancel the jobs and end their leftovers, keep the daemons running.
set -uo pipefail

JOBS_ONLY=false
if [ "${1:-}" = --jobs-only ]; then
    JOBS_ONLY=true
    shift
fi
STATE=${1:-/tmp/shardtune-slurm}
[ -d "$STATE" ] || exit 0

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
sleep 2
# proctrack/linuxproc loses job processes whose parent died first (a job-side Snakemake
# that ignores SIGTERM): end those still carrying this test cluster's name.
for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}
    pid=${pid%/environ}
    if { tr '\0' '\n' <"$environ"; } 2>/dev/null | grep -qx "SLURM_CLUSTER_NAME=shardtune-test"; then
        echo "ending leftover job process $pid" >&2
        kill -9 "$pid" 2>/dev/null
    fi
done
$JOBS_ONLY && exit 0

for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
    [ -f "$pidfile" ] && stop_pid "$(basename "$pidfile" .pid)" "$(cat "$pidfile")"
done
if [ -f "$STATE/munged.started" ]; then
    pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
    [ -n "$pid" ] && stop_pid munged "$pid"
    rm -f "$STATE/munged.started"
fi
exit 0
