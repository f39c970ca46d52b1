#!/usr/bin/env python3
"""Print running, success or failed for one PBS Professional job id.

Snakemake's cluster-generic executor runs `pbs-status.py JOBID` (the profile's
cluster-generic-status-cmd) for every active job at each status check, and reads exactly one of
the three words from stdout. Given one job id, the script exits 0, because Snakemake stops the
whole run when a status command fails. A qstat error, time-out or unreadable output therefore
prints running, and the next check queries qstat again.

It logs to stderr (Snakemake's terminal) what it saw for finished, held and unknown jobs and
for qstat errors; with LMPRUNE_PBS_DEBUG=1 it logs every check.
"""

import os
import subprocess
import sys
from pathlib import Path

# lmprune.cluster lives in src/ of the repository that contains this profile. It uses only the
# standard library, so any Python 3.10 or newer runs this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lmprune import cluster  # noqa: E402

QSTAT_TIMEOUT_SECONDS = 60


def check(job_id: str) -> cluster.JobStatus:
    """Query qstat about the job, and read its exit record when the server does not know it."""
    try:
        result = subprocess.run(
            cluster.qstat_command(job_id), capture_output=True, text=True, timeout=QSTAT_TIMEOUT_SECONDS
        )
        seen = cluster.job_status(job_id, result.returncode, result.stdout, result.stderr)
    except subprocess.TimeoutExpired:
        seen = cluster.JobStatus(cluster.RUNNING, "", f"qstat timed out after {QSTAT_TIMEOUT_SECONDS} s")
    except OSError as error:
        seen = cluster.JobStatus(cluster.RUNNING, "", f"cannot run qstat: {error}")

    if seen.status == cluster.UNKNOWN:
        seen = cluster.status_from_exit_record(job_id)
    return seen


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: pbs-status.py JOBID")
    job_id = sys.argv[1]
    debug = os.environ.get("LMPRUNE_PBS_DEBUG") == "1"

    try:
        seen = check(job_id)
    except Exception as error:  # noqa: BLE001 - any failure here must not stop the Snakemake run
        seen = cluster.JobStatus(cluster.RUNNING, "", f"status check of {job_id} failed: {error!r}")

    if debug or seen.needs_attention:
        print(f"pbs-status: {seen.status}: {seen.message}", file=sys.stderr)
    print(seen.status)


if __name__ == "__main__":
    main()
