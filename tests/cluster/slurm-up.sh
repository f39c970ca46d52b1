#!/usr/bin/env bash
# Start a one-node Slurm cluster on this host for tests/test_cluster.py: munged, slurmctld and
# slurmd, with this host as the only node. Safe to run again: it installs, writes and starts only
# what is missing, and restarts a daemon only when its config changed.
#
#   sudo tests/cluster/slurm-up.sh          (root: it installs packages and starts daemons)
#   tests/cluster/slurm-down.sh             stops the daemons again
#
# Environment:
#   SLURM_TEST_CPUS   CPUs declared for the node (default: the host's count, at least 4; see below)
#   SLURM_CONF_DIR    config folder (default /etc/slurm, where the Debian client tools look)
#
# Written for Debian/Ubuntu packages (slurm-wlm 22.05 on Debian 12). There is no accounting
# database, so `sacct` has no records: job states come from `squeue --states=all` and
# `scontrol show job`, which keep finished jobs for MinJobAge (1 hour here).
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
MARKER="# Written by tests/cluster/slurm-up.sh"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

say() { echo "slurm-up: $*"; }
fail() {
    echo "slurm-up: error: $*" >&2
    exit 1
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ $EUID -ne 0 ]]; then
    fail "run as root: this script installs packages, writes $CONF_DIR and starts daemons"
fi

# --- packages -------------------------------------------------------------------------------
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    say "packages present: $(slurmctld -V)"
else
    say "installing slurm-wlm and munge with apt-get"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
fi

# --- munge ----------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
# /run is a tmpfs on most systems: the socket folder is gone after every boot.
mkdir -p /run/munge
chown munge:munge /run/munge
chmod 0755 /run/munge

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    say "starting munged"
    runuser -u munge -- munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || fail "munged does not answer; see /var/log/munge/munged.log"
fi

# --- slurm.conf -----------------------------------------------------------------------------
host=$(hostname -s)
address=$(getent ahostsv4 "$host" | awk 'NR == 1 {print $1}')
[[ -n $address ]] || fail "host name $host does not resolve to an IPv4 address; add it to /etc/hosts"

# Bind the daemons to the address the host name resolves to when that is a loopback address, so
# nothing listens on an outside interface. Otherwise they bind to all addresses (Slurm's default).
if [[ $address == 127.* ]]; then
    communication="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
    say "$host resolves to $address: daemons listen on that address only"
else
    communication="# CommunicationParameters left at the default: $host resolves to $address, not loopback"
    say "$host resolves to $address (not loopback): daemons listen on all addresses"
fi

# slurmd -C prints what slurmd detects, e.g. "NodeName=vm CPUs=2 ... RealMemory=24105".
detected=$(slurmd -C | head -1)
real_cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$detected")
real_memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
[[ -n $real_cpus && -n $real_memory ]] || fail "cannot parse 'slurmd -C' output: $detected"

# The tests run jobs that only sleep (walltime and kill cases) next to jobs that compute, so the
# node declares at least 4 CPUs, even on a 2-core host. config_overrides stops slurmd from
# draining a node that has fewer CPUs than it declares.
cpus=${SLURM_TEST_CPUS:-$((real_cpus > 4 ? real_cpus : 4))}
# 90 % of the detected memory: a node that declares more than slurmd finds is drained.
memory=$((real_memory * 9 / 10))
overrides=""
if ((cpus > real_cpus)); then
    overrides="SlurmdParameters=config_overrides"
fi

new_conf=$(
    cat <<EOF
$MARKER on $(date -u +%Y-%m-%d) for a one-node test cluster.
# The script rewrites this file when its settings change; delete the first line to keep edits.
ClusterName=lmprune-test
SlurmctldHost=$host($address)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
$communication
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: plain process tracking works in containers and sandboxes without a cgroup mount.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
# Finished jobs stay visible to squeue and scontrol for an hour: there is no sacct database.
MinJobAge=3600
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MpiDefault=none
# Seconds between SIGTERM and SIGKILL when a job reaches its time limit (default 30).
KillWait=5
$overrides
NodeName=$host NodeAddr=$address CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=prod Nodes=$host MaxTime=INFINITE State=UP
EOF
)

mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
conf=$CONF_DIR/slurm.conf
conf_changed=false
if [[ -e $conf ]] && ! head -1 "$conf" | grep -q "^$MARKER"; then
    say "keeping $conf: it was not written by this script"
elif [[ -e $conf ]] && diff -q <(sed 1d "$conf") <(sed 1d <<<"$new_conf") >/dev/null; then
    say "$conf is up to date"
else
    say "writing $conf (node $host, $cpus CPUs, ${memory} MB)"
    printf '%s\n' "$new_conf" >"$conf"
    conf_changed=true
fi

# --- daemons --------------------------------------------------------------------------------
stop_daemon() {
    local name=$1 pidfile=$2 pid
    pid=$(cat "$pidfile")
    say "stopping $name (pid $pid) to load the new config"
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    fail "$name (pid $pid) did not stop within 10 s"
}

if pid_alive "$CTLD_PID" && $conf_changed; then
    stop_daemon slurmctld "$CTLD_PID"
fi
if pid_alive "$SLURMD_PID" && $conf_changed; then
    stop_daemon slurmd "$SLURMD_PID"
fi

if pid_alive "$CTLD_PID"; then
    say "slurmctld already running (pid $(cat "$CTLD_PID"))"
else
    say "starting slurmctld"
    slurmctld
fi
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
done
scontrol ping | grep -q "is UP" || fail "slurmctld does not answer; see $LOG_DIR/slurmctld.log"

if pid_alive "$SLURMD_PID"; then
    say "slurmd already running (pid $(cat "$SLURMD_PID"))"
else
    say "starting slurmd"
    slurmd
fi

# A node that is up shows idle, or mixed/allocated while jobs run.
state=""
for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T | head -1)
    case $state in
        idle | mixed | allocated | completing) break ;;
    esac
    sleep 1
done
case $state in
    idle | mixed | allocated | completing) ;;
    *)
        sinfo -R >&2 || true
        fail "node $host is '$state' after 60 s; see $LOG_DIR/slurmd.log and 'sinfo -R'"
        ;;
esac
say "node $host is $state; partitions: $(sinfo -h -o %P | paste -sd' ')"
