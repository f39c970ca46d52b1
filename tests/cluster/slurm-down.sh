#!/usr/bin/env bash
# Stop the test cluster that tests/cluster/slurm-up.sh started: slurmd, slurmctld, then munged.
# Each daemon is stopped by the process id in its pid file. Packages, config and the controller's
# saved state stay, so slurm-up.sh starts the same cluster again.
set -euo pipefail

say() { echo "slurm-down: $*"; }

if [[ $EUID -ne 0 ]]; then
    echo "slurm-down: error: run as root: the daemons run as root" >&2
    exit 1
fi

stop_daemon() {
    local name=$1 pidfile=$2 pid
    if [[ ! -s $pidfile ]] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "$name is not running"
        return 0
    fi
    pid=$(cat "$pidfile")
    say "stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "slurm-down: error: $name (pid $pid) did not stop within 10 s" >&2
    exit 1
}

stop_daemon slurmd /run/slurmd.pid
stop_daemon slurmctld /run/slurmctld.pid
stop_daemon munged /run/munge/munged.pid
