#!/usr/bin/env python3
"""Delete PBS Professional jobs: `pbs-cancel.py JOBID...` runs `qdel JOBID...`.

Snakemake's cluster-generic executor runs it (the profile's cluster-generic-cancel-cmd) when a
run is interrupted, and kills it after 2 seconds (plugin version 1.0.9). qdel runs in its own
session, so it finishes deleting the jobs even then.
"""

import subprocess
import sys


def main() -> int:
    job_ids = sys.argv[1:]
    if not job_ids:
        return 0
    try:
        return subprocess.run(["qdel", *job_ids], start_new_session=True).returncode
    except FileNotFoundError:
        print("pbs-cancel: qdel not found on PATH; delete the jobs with qdel by hand", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
