#!/usr/bin/env python3
"""Submit one Snakemake job to PBS Professional and print the job id that qsub returned.

Snakemake's cluster-generic executor runs `pbs-submit.py JOBSCRIPT` (the profile's
cluster-generic-submit-cmd) for every job and group job. The request comes from the job's
properties in JOBSCRIPT and from the site settings in site.yaml beside this script, or in the
file that LMPRUNE_PBS_SITE names. The PBS job script is written beside JOBSCRIPT as
JOBSCRIPT.pbs. Every submission is appended to logs/pbs/qsub.log.

    pbs-submit.py --dry-run JOBSCRIPT    print the qsub command line instead of running it
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# lmprune.cluster lives in src/ of the repository that contains this profile, so the script
# works whichever Python runs it, as long as PyYAML is installed (Snakemake requires it).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lmprune import cluster  # noqa: E402

QSUB_ATTEMPTS = 3
QSUB_RETRY_SECONDS = 10
QSUB_TIMEOUT_SECONDS = 120


def log(message: str) -> None:
    print(f"pbs-submit: {message}", file=sys.stderr)


def run_qsub(command: list[str]) -> subprocess.CompletedProcess:
    """Run qsub with its output in temporary files instead of pipes.

    PBS Pro's qsub may leave a background process behind to talk to the server (qsub(1B),
    option -f). Reading a pipe would wait for that process too, if it kept the pipe open.
    """
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        returncode = subprocess.run(command, stdout=stdout, stderr=stderr, timeout=QSUB_TIMEOUT_SECONDS).returncode
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(command, returncode, stdout.read(), stderr.read())


def submit(command: list[str]) -> str:
    """Run qsub, retrying when it exits non-zero (server busy or restarting); return the job id.

    A qsub that times out is not retried, because the server may have queued the job anyway.
    """
    for attempt in range(1, QSUB_ATTEMPTS + 1):
        try:
            result = run_qsub(command)
        except FileNotFoundError:
            sys.exit("pbs-submit: qsub not found on PATH; run Snakemake on a PBS login node")
        except subprocess.TimeoutExpired:
            sys.exit(
                f"pbs-submit: qsub timed out after {QSUB_TIMEOUT_SECONDS} s and may have queued the job; "
                f"check qstat -u $USER before rerunning. Command: {shlex.join(command)}"
            )
        if result.returncode == 0:
            try:
                return cluster.parse_qsub_output(result.stdout)
            except ValueError as error:
                sys.exit(f"pbs-submit: {error}. Command: {shlex.join(command)}")
        log(f"qsub failed (attempt {attempt} of {QSUB_ATTEMPTS}, exit status {result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}")
        if attempt < QSUB_ATTEMPTS:
            time.sleep(QSUB_RETRY_SECONDS)
    sys.exit(f"pbs-submit: qsub failed {QSUB_ATTEMPTS} times. Command: {shlex.join(command)}")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobscript", help="the job script that Snakemake wrote")
    parser.add_argument("--dry-run", action="store_true", help="print the qsub command line and submit nothing")
    arguments = parser.parse_args()

    site_path = os.environ.get("LMPRUNE_PBS_SITE") or Path(__file__).resolve().parent / "site.yaml"
    try:
        site = cluster.load_site(site_path)
        properties = cluster.read_job_properties(arguments.jobscript)
        script = f"{arguments.jobscript}.pbs"
        command = cluster.qsub_command(properties, site, script, cluster.submission_timestamp())
    except (cluster.SiteError, ValueError, OSError) as error:
        sys.exit(f"pbs-submit: {error}")

    Path(script).write_text(cluster.pbs_job_script(Path(arguments.jobscript).read_text(), site, os.getcwd()))
    if arguments.dry_run:
        print(shlex.join(command))
        return

    cluster.LOG_DIR.mkdir(parents=True, exist_ok=True)
    job_id = submit(command)
    with open(cluster.LOG_DIR / "qsub.log", "a") as record:
        record.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{job_id}\t{shlex.join(command)}\n")
    print(job_id)


if __name__ == "__main__":
    main()
