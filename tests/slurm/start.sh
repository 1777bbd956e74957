#!/usr/bin/env bash
# Start a real SLURM on this one machine for the SLURM profile's tests: munge, slurmctld and
# one slurmd per node (default 2 nodes, shardtune1 and shardtune2, both this host), each node
# with this machine's CPUs and memory and fake GPUs as gres. Needs root; installs Debian's
# packages when they are missing.
#
#   tests/slurm/start.sh [STATE_DIR]     (default /tmp/shardtune-slurm)
#   tests/slurm/stop.sh [STATE_DIR]
#
# Exit status 0: running (nodes idle); 3: SLURM cannot be started here (the reason on
# stderr; tests skip on it); anything else: a real failure.
# NODES (default 2) and FAKE_GPUS (per node, default 2) size the cluster. The node names do
# not resolve: multi-node jobs set fsdp.main_process_ip: 127.0.0.1.
# The config goes to /etc/slurm (jobs' own srun calls look there: the Snakemake plugin drops
# SLURM_CONF from a job's environment); an /etc/slurm/slurm.conf written by anything else is
# left alone and the script gives up.
set -euo pipefail

STATE=${1:-/tmp/shardtune-slurm}
NODES=${NODES:-2}
GPUS=${FAKE_GPUS:-2}
PACKAGES=(slurmctld slurmd slurm-client munge)
CONF=/etc/slurm/slurm.conf
MARK="# written by shardtune tests/slurm/start.sh"

cannot() {
    echo "SLURM cannot be started here: $*" >&2
    exit 3
}

[ "$(id -u)" = 0 ] || cannot "needs root (the daemons run as root)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || cannot "the packages ${PACKAGES[*]} are missing and there is no apt-get"
    echo "installing ${PACKAGES[*]}" >&2
    mkdir -p "$(dirname "$STATE")"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$STATE.apt.log" 2>&1 \
        || cannot "apt-get install ${PACKAGES[*]} failed (see $STATE.apt.log)"
fi
if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    cannot "$CONF exists and was not written by this script"
fi
if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "SLURM already running from $STATE" >&2
    exit 0
fi

mkdir -p "$STATE"/{state,gpus} /etc/slurm
HOST=$(hostname -s)
CPUS=$(nproc)
# slurmd -C reports the memory it will register; ask for a little less so nodes are not drained.
REAL_MB=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM_MB=$((REAL_MB * 9 / 10))
NAMES=()
for ((n = 1; n <= NODES; n++)); do NAMES+=("shardtune$n"); done

# Fake GPU device files: distinct device nodes (several gres cannot share one file).
{
    echo "$MARK"
    echo "AutoDetect=off"
    for ((n = 0; n < NODES; n++)); do
        for ((i = 0; i < GPUS; i++)); do
            dev="$STATE/gpus/gpu$((n * GPUS + i))"
            [ -e "$dev" ] || mknod "$dev" c 1 3
            echo "NodeName=${NAMES[n]} Name=gpu File=$dev"
        done
    done
} >/etc/slurm/gres.conf

{
    cat <<EOF
$MARK
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
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
GresTypes=gpu
EOF
    # several slurmd on one host: each node its own port, all at this host's address
    for ((n = 0; n < NODES; n++)); do
        echo "NodeName=${NAMES[n]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17001 + n))" \
            "CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NAMES[*]}") Default=YES MaxTime=INFINITE State=UP"
} >"$CONF"

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

slurmctld
wait_for 20 slurmctld scontrol ping
for name in "${NAMES[@]}"; do slurmd -N "$name"; done
all_idle() { [ "$(sinfo -h -N -o %t | grep -cx idle)" = "$NODES" ]; }
wait_for 30 "$NODES idle nodes" all_idle || {
    sinfo -N -l >&2
    tail -n 20 "$STATE"/slurmd-*.log >&2
    exit 1
}
echo "SLURM running ($CONF): nodes ${NAMES[*]} on $HOST, each $CPUS CPUs, ${MEM_MB} MB, gpu:$GPUS" >&2
