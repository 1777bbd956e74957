#!/usr/bin/env bash
# Start a real single-node SLURM (munge, slurmctld, slurmd) with fake GPUs as gres, for the
# SLURM profile's tests. Needs root; installs Debian's packages when they are missing.
#
#   tests/slurm/start.sh [STATE_DIR]     (default /tmp/shardtune-slurm)
#   export SLURM_CONF=STATE_DIR/slurm.conf   # what clients (sbatch, squeue) need
#   tests/slurm/stop.sh [STATE_DIR]
#
# Exit status 0: running (idle node); 3: SLURM cannot be started here (the reason on
# stderr; tests skip on it); anything else: a real failure.
# FAKE_GPUS (default 2) sets the node's number of gres GPUs.
set -euo pipefail

STATE=${1:-/tmp/shardtune-slurm}
GPUS=${FAKE_GPUS:-2}
PACKAGES=(slurmctld slurmd slurm-client munge)

cannot() {
    echo "SLURM cannot be started here: $*" >&2
    exit 3
}

[ "$(id -u)" = 0 ] || cannot "needs root (the daemons run as root)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || cannot "the packages ${PACKAGES[*]} are missing and there is no apt-get"
    echo "installing ${PACKAGES[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$STATE.apt.log" 2>&1 \
        || cannot "apt-get install ${PACKAGES[*]} failed (see $STATE.apt.log)"
fi

if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "SLURM already running from $STATE" >&2
    exit 0
fi

mkdir -p "$STATE"/{spool,state,gpus}
HOST=$(hostname -s)
CPUS=$(nproc)
# slurmd -C reports the memory it will register; ask for a little less so the node is not drained.
REAL_MB=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM_MB=$((REAL_MB * 9 / 10))

# Fake GPU device files: distinct device nodes (several gres cannot share one file).
: >"$STATE/gres.conf"
echo "AutoDetect=off" >>"$STATE/gres.conf"
for ((i = 0; i < GPUS; i++)); do
    [ -e "$STATE/gpus/gpu$i" ] || mknod "$STATE/gpus/gpu$i" c 1 3
    echo "NodeName=$HOST Name=gpu File=$STATE/gpus/gpu$i" >>"$STATE/gres.conf"
done

cat >"$STATE/slurm.conf" <<EOF
ClusterName=shardtune-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
ReturnToService=2
# The Snakemake SLURM plugin reads job states with squeue here (no accounting): finished
# jobs must stay visible long enough.
MinJobAge=600
KillWait=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$STATE/slurm.conf

wait_for() { # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2
    shift 2
    for ((t = 0; t < limit * 4; t++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    echo "timed out waiting for $what" >&2
    return 1
}

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.started"
    wait_for 10 munge sh -c 'munge -n | unmunge'
fi

slurmctld -f "$SLURM_CONF"
wait_for 20 slurmctld scontrol ping
slurmd -f "$SLURM_CONF"
node_idle() { sinfo -h -n "$HOST" -o %t | grep -qx idle; }
wait_for 30 "node $HOST to be idle" node_idle || {
    sinfo -N -l >&2
    tail -20 "$STATE/slurmd.log" >&2
    exit 1
}
echo "SLURM running: SLURM_CONF=$SLURM_CONF, node $HOST with $CPUS CPUs, ${MEM_MB} MB, gpu:$GPUS" >&2
