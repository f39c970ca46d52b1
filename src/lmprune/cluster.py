"""PBS Professional commands for the Snakemake profile in profiles/pbs: qsub, qstat and qdel.

Snakemake's cluster-generic executor calls three small scripts in profiles/pbs, and they call
the functions here:

- ``pbs-submit.py JOBSCRIPT`` reads the job's properties from the ``# properties = {...}``
  line of the job script: rule, wildcards, threads and resources, which Snakemake sums over the
  jobs of a group job. It writes a PBS job script that runs the site's set-up lines and then
  the Snakemake job, submits it with qsub and prints the job id that qsub returned.
- ``pbs-status.py JOBID`` runs ``qstat -x -f -F json JOBID`` and prints running, success or
  failed.
- ``pbs-cancel.py JOBID...`` runs qdel.

Everything a site sets lives in profiles/pbs/site.yaml (see :class:`Site`). This module uses
only the standard library, except :func:`load_site`, which needs PyYAML. The status script
imports it for every status check, so it stays free of torch and Snakemake.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

# Folder of the PBS output and error files of every job, relative to the Snakemake working
# folder. It is fixed, so the status script finds the exit records without reading site.yaml.
LOG_DIR = Path("logs/pbs")
EXIT_DIR = LOG_DIR / "exit"

RUNNING = "running"
SUCCESS = "success"
FAILED = "failed"
UNKNOWN = "unknown"  # qstat does not know the job; used internally, never printed for Snakemake

# PBS Pro job states (qstat(1B)): finished is F, and X for a finished subjob of an array.
# Q queued, H held, W waiting for its start time, T in transit, R running, E exiting,
# B array begun, S and U suspended, M moved to another server: all still to finish.
FINISHED_STATES = {"F", "X"}

# PBS Pro accepts job names of up to 236 characters that start with a letter or digit and
# contain no white space (qsub(1B), option -N, OpenPBS doc/man1/qsub.1B).
MAX_JOB_NAME = 236

# qstat's message for a job id the server does not know, or no longer keeps in its history.
UNKNOWN_JOB = "Unknown Job Id"

_PROPERTIES_LINE = re.compile(r"^# properties = (.*)$", re.MULTILINE)
_JOB_NAME_CHARACTER = re.compile(r"[^A-Za-z0-9_.-]")
_JOB_ID = re.compile(r"^\d+(\[\d*\])?(\.\S+)?$")


class SiteError(ValueError):
    """An invalid profiles/pbs/site.yaml, with a message naming the key and the fix."""


@dataclass
class Site:
    """The settings of one PBS Professional site, read from profiles/pbs/site.yaml."""

    account: str = ""  # qsub -A: the project charged for the jobs
    queue: str = ""  # qsub -q; empty for the server's default queue
    filesystems: str = ""  # qsub -l filesystems=...; ALCF systems require it
    system: str = ""  # select chunk resource system=<name>; Polaris: polaris
    memory: bool = False  # request each job's mem_mb as select chunk resource mem=
    select_extra: str = ""  # more chunk resources appended to select, e.g. "mpiprocs=1"
    qsub_args: list[str] = field(default_factory=list)  # more qsub arguments, e.g. ["-l", "place=scatter"]
    setup: str = ""  # shell lines each job runs before Snakemake: modules, venv, exports

    def __post_init__(self):
        for name in ("account", "queue", "filesystems", "system", "select_extra", "setup"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, "")
            elif isinstance(value, int) and not isinstance(value, bool):
                # YAML reads a numeric account such as 123456 as an integer.
                setattr(self, name, str(value))
            elif not isinstance(value, str):
                raise SiteError(f"{name} must be a string, got {value!r}")
        if not isinstance(self.memory, bool):
            raise SiteError(f"memory must be true or false, got {self.memory!r}")
        if self.qsub_args is None:
            self.qsub_args = []
        if not isinstance(self.qsub_args, list) or not all(isinstance(item, str) for item in self.qsub_args):
            raise SiteError(f"qsub_args must be a list of strings, got {self.qsub_args!r}")
        if ":" in self.system or "=" in self.system:
            raise SiteError(f"system must be a plain name such as polaris, got {self.system!r}")
        if self.select_extra.startswith(":"):
            self.select_extra = self.select_extra[1:]


def load_site(path: str | os.PathLike) -> Site:
    """Read a site.yaml into a :class:`Site`.

    Raises:
        SiteError: if the file is missing, is not a mapping, or has an unknown key or a value of
            the wrong type.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SiteError(f"site settings not found: {path}. Copy profiles/pbs/site.yaml and edit it.") from None
    except yaml.YAMLError as error:
        raise SiteError(f"{path} is not valid YAML: {error}") from None

    data = data or {}
    if not isinstance(data, dict):
        raise SiteError(f"{path} must contain a mapping of settings, got {type(data).__name__}")
    known = {item.name for item in fields(Site)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SiteError(f"unknown key(s) {', '.join(unknown)} in {path}; the keys are {', '.join(sorted(known))}")
    try:
        return Site(**data)
    except SiteError as error:
        raise SiteError(f"{path}: {error}") from None


# --- submission -------------------------------------------------------------------------------


def read_job_properties(jobscript: str | os.PathLike) -> dict:
    """Return the job properties that Snakemake writes into the second line of a job script.

    A single job has ``type: single``, ``rule``, ``wildcards``, ``threads`` and ``resources``.
    A group job has ``type: group``, ``groupid`` and the ``threads`` and ``resources`` that
    Snakemake summed over the jobs it runs at the same time.
    """
    text = Path(jobscript).read_text()
    match = _PROPERTIES_LINE.search(text)
    if not match:
        raise ValueError(f"no '# properties = ' line in Snakemake job script {jobscript}")
    return json.loads(match.group(1))


def job_name(properties: dict) -> str:
    """Return the PBS job name: the rule and its wildcard values, or the group and its id.

    ``finetune_eval.clm.gpt2-medium.magnitude.s50``, ``gpu-node.c9d1be77``.
    """
    if properties.get("type") == "group":
        parts = [properties.get("groupid") or "group", str(properties.get("jobid", ""))[:8]]
    else:
        parts = [properties.get("rule") or "job", *map(str, (properties.get("wildcards") or {}).values())]
    name = ".".join(part for part in parts if part)
    name = _JOB_NAME_CHARACTER.sub("_", name)
    if not name[:1].isalnum():
        name = "j" + name
    return name[:MAX_JOB_NAME]


def walltime(runtime_minutes) -> str:
    """Format Snakemake's ``runtime`` resource (minutes) as a PBS walltime, HH:MM:SS.

    Hours are not capped at 24 (2 days is 48:00:00). Fractions of a minute round up.

    Raises:
        ValueError: for a runtime that is not a positive number of minutes.
    """
    try:
        minutes = float(runtime_minutes)
    except (TypeError, ValueError):
        raise ValueError(f"runtime must be a number of minutes, got {runtime_minutes!r}") from None
    if not minutes > 0 or math.isinf(minutes):
        raise ValueError(f"runtime must be a positive number of minutes, got {runtime_minutes!r}")
    seconds = math.ceil(minutes * 60)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _whole_number(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise ValueError(f"resource {name} must be a whole number of at least 0, got {value!r}")
    return int(value)


def memory_mib(resources: dict) -> int | None:
    """Return the job's memory in MiB, the unit of PBS's ``mb`` suffix, or None if unset.

    Snakemake derives ``mem_mib`` from ``mem_mb`` (10^6 bytes); a group job carries both sums.
    """
    if "mem_mib" in resources:
        return _whole_number(resources["mem_mib"], "mem_mib")
    if "mem_mb" in resources:
        return math.ceil(_whole_number(resources["mem_mb"], "mem_mb") * 10**6 / 2**20)
    return None


def select_statement(properties: dict, site: Site) -> str:
    """Return the one-chunk PBS select statement for a job, without the ``select=`` prefix.

    ``1:ncpus=<threads>[:ngpus=<gpu>][:mem=<MiB>mb][:system=<system>][:<select_extra>]``.
    ngpus is left out for jobs without GPUs, so sites that define no ngpus resource accept
    them. mem is added only where the site sets ``memory: true``.
    """
    resources = properties.get("resources") or {}
    threads = max(1, _whole_number(properties.get("threads", 1), "threads"))
    chunk = [f"ncpus={threads}"]

    gpus = _whole_number(resources.get("gpu", 0), "gpu")
    if gpus:
        chunk.append(f"ngpus={gpus}")

    if site.memory:
        mib = memory_mib(resources)
        if mib:
            chunk.append(f"mem={mib}mb")

    if site.system:
        chunk.append(f"system={site.system}")
    if site.select_extra:
        chunk.append(site.select_extra)
    return "1:" + ":".join(chunk)


def log_paths(name: str, timestamp: str) -> tuple[str, str]:
    """Return the -o and -e paths of a job, relative to the working folder.

    The submission time in the names keeps reruns and retries from overwriting earlier logs.
    The paths contain no colon, which PBS would read as ``host:path``.
    """
    stem = LOG_DIR / f"{name}.{timestamp}"
    return f"{stem}.out", f"{stem}.err"


def qsub_command(properties: dict, site: Site, script: str, timestamp: str) -> list[str]:
    """Return the qsub argument list that submits ``script`` for a Snakemake job.

    Raises:
        ValueError: if the job has no runtime, or a resource is not a valid number.
    """
    resources = properties.get("resources") or {}
    if "runtime" not in resources:
        raise ValueError(
            "the job has no runtime resource, so it would get the queue's default walltime. "
            "Set default-resources: runtime in the profile."
        )
    name = job_name(properties)
    output, error = log_paths(name, timestamp)

    command = ["qsub"]
    if site.account:
        command += ["-A", site.account]
    if site.queue:
        command += ["-q", site.queue]
    command += ["-l", f"select={select_statement(properties, site)}"]
    command += ["-l", f"walltime={walltime(resources['runtime'])}"]
    if site.filesystems:
        command += ["-l", f"filesystems={site.filesystems}"]
    command += ["-N", name, "-o", output, "-e", error]
    command += site.qsub_args
    command.append(script)
    return command


def pbs_job_script(snakemake_jobscript: str, site: Site, workdir: str) -> str:
    """Return the script that PBS runs for one Snakemake job.

    It changes to ``workdir`` (PBS starts jobs in the home folder), runs the site's set-up
    lines, then the Snakemake job script's commands in a subshell, whose own ``exit`` cannot skip
    the last step: writing the exit status to ``logs/pbs/exit/$PBS_JOBID``. The status script
    reads that record when the server has no history of a finished job. The job script is
    copied in whole, because PBS keeps its own copy of the script from submission, while
    Snakemake deletes its temporary folder when it stops.

    The script is POSIX sh, because PBS may run it with the user's login shell instead of
    the ``#!`` line.
    """
    body = [line for line in snakemake_jobscript.splitlines() if not line.startswith("#!")]
    lines = [
        "#!/bin/bash -l",
        "# PBS job script written by profiles/pbs/pbs-submit.py for one Snakemake job.",
        f"cd {shlex.quote(workdir)} || exit 1",
    ]
    if site.setup.strip():
        lines.append("# Set-up lines from profiles/pbs/site.yaml")
        lines += site.setup.strip("\n").splitlines()
    # An absolute path, in case a set-up line changes the folder.
    exit_dir = shlex.quote(str(Path(workdir) / EXIT_DIR))
    lines += [
        "# The Snakemake job",
        "(",
        *body,
        ")",
        "status=$?",
        f'mkdir -p {exit_dir} && echo "$status" > {exit_dir}/"${{PBS_JOBID:-unknown}}"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def submission_timestamp() -> str:
    """Return the local time as 20261204T203015, a form without colons for file names."""
    return time.strftime("%Y%m%dT%H%M%S")


def parse_qsub_output(stdout: str) -> str:
    """Return the job id from qsub's output, such as ``1234.polaris-pbs-01``.

    Raises:
        ValueError: if the first non-empty line is not a PBS job id.
    """
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines or not _JOB_ID.match(lines[0]):
        raise ValueError(f"qsub printed no job id: {stdout.strip()!r}")
    return lines[0]


# --- status -----------------------------------------------------------------------------------


def qstat_command(job_id: str) -> list[str]:
    """Return the qstat call that shows one job, finished jobs included (-x)."""
    return ["qstat", "-x", "-f", "-F", "json", job_id]


def _same_job(key: str, job_id: str) -> bool:
    """Tell whether qstat's job key names ``job_id``; either may lack the server suffix."""
    return key == job_id or key.split(".")[0] == job_id.split(".")[0]


def _job_fields(stdout: str, job_id: str) -> dict | None:
    """Return job_state, Exit_status and comment of ``job_id`` from ``qstat -f -F json``.

    Returns {} if the output is valid but does not list the job, and None if it cannot be
    read. qstat has written invalid JSON for environment variables in Variable_List: backslashes
    and quotes left unescaped, digit-only values such as 005 left unquoted (OpenPBS 19 and 20,
    openpbs/openpbs GitHub issues 1255 and 2541). Output that does not parse therefore falls
    back to picking the three attributes out of the text, which describes a single job here.
    """
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        jobs = data.get("Jobs") or {}
        for key, attributes in jobs.items():
            if _same_job(key, job_id) and isinstance(attributes, dict):
                return attributes
        return {}

    state = re.search(r'"job_state"\s*:\s*"([A-Z])"', stdout)
    if not state:
        return None
    attributes = {"job_state": state.group(1)}
    exit_status = re.search(r'"Exit_status"\s*:\s*(-?\d+)', stdout)
    if exit_status:
        attributes["Exit_status"] = int(exit_status.group(1))
    comment = re.search(r'"comment"\s*:\s*"((?:[^"\\]|\\.)*)"', stdout)
    if comment:
        attributes["comment"] = comment.group(1)
    return attributes


def status_from_exit_code(exit_status) -> str:
    """Map a PBS Exit_status to success or failed.

    0 is success, and any other value is a failure. Values 1 to 255 are the job's own exit
    code. PBS uses codes below 0 for jobs it ended (JOB_EXEC_KILL_WALLTIME -29,
    JOB_EXEC_KILL_MEM -27), and 256 + N for a job killed by signal N (271 for SIGTERM).
    """
    try:
        return SUCCESS if int(exit_status) == 0 else FAILED
    except (TypeError, ValueError):
        return FAILED


class JobStatus(NamedTuple):
    """Result of one qstat call about one job."""

    status: str  # running, success, failed, or UNKNOWN when the server does not know the job
    state: str  # PBS job_state (Q, R, H, F, ...), or "" when qstat showed none
    message: str  # what qstat showed, for the log

    @property
    def needs_attention(self) -> bool:
        """True for finished, held and unknown jobs and for qstat errors, which the status script logs."""
        return self.status != RUNNING or self.state in ("", "H")


def job_status(job_id: str, returncode: int, stdout: str, stderr: str) -> JobStatus:
    """Map the result of :func:`qstat_command` to a :class:`JobStatus`.

    The status is running, success or failed. It is UNKNOWN when the server does not know
    the job, because the job was never submitted there or has finished and left the server's
    history. :func:`status_from_exit_record` decides those. A qstat that fails any other way,
    or output that cannot be read, counts as running, because a busy or restarting server must
    not fail jobs that are still fine. The message then describes the error.
    """
    if returncode != 0:
        if UNKNOWN_JOB in stderr:
            return JobStatus(UNKNOWN, "", f"qstat does not know {job_id}: {stderr.strip()}")
        return JobStatus(RUNNING, "", f"qstat failed with exit status {returncode}: {stderr.strip() or stdout.strip()}")

    attributes = _job_fields(stdout, job_id)
    if attributes is None:
        return JobStatus(RUNNING, "", f"cannot read qstat output for {job_id}: {stdout.strip()[:200]!r}")
    if not attributes:
        return JobStatus(UNKNOWN, "", f"qstat output lists no job {job_id}")

    state = str(attributes.get("job_state", ""))
    comment = attributes.get("comment", "")
    if state in FINISHED_STATES:
        exit_status = attributes.get("Exit_status")
        status = status_from_exit_code(exit_status)
        message = f"{job_id} finished (job_state {state}) with Exit_status {exit_status}"
        if comment:
            message += f"; {comment}"
        if status == FAILED and attributes.get("Error_Path"):
            # host:path, as qsub -e sets it
            message += f"; stderr in {str(attributes['Error_Path']).split(':', 1)[-1]}"
        return JobStatus(status, state, message)
    if not state:
        return JobStatus(RUNNING, "", f"qstat output for {job_id} has no job_state")
    message = f"{job_id} job_state {state}"
    return JobStatus(RUNNING, state, f"{message}; {comment}" if comment else message)


def exit_record_path(job_id: str, exit_dir: Path = EXIT_DIR) -> Path | None:
    """Return the exit record the job script wrote for ``job_id``, or None if there is none.

    A record named with the full job id comes first. Otherwise a record with the same sequence
    number counts, because qsub and $PBS_JOBID may spell the server name differently.
    """
    exact = exit_dir / job_id
    if exact.is_file():
        return exact
    sequence = job_id.split(".")[0]
    if exit_dir.is_dir():
        for path in exit_dir.iterdir():
            if path.name.split(".")[0] == sequence:
                return path
    return None


def status_from_exit_record(job_id: str, exit_dir: Path = EXIT_DIR) -> JobStatus:
    """Return the status of a job that qstat does not know, from the job's exit record.

    Servers without job history forget a job as soon as it ends. That is PBS's default: the
    server attribute job_history_enable is False unless set (OpenPBS pbs_server_attributes(7B)). The exit code in the job script's exit record then decides. Without
    a record the job never ran its script to the end (deleted, killed, lost with its node), so
    it counts as failed.
    """
    path = exit_record_path(job_id, exit_dir)
    if path is None:
        return JobStatus(FAILED, "", f"qstat does not know {job_id}, and it left no exit record in {exit_dir}")
    text = path.read_text().strip()
    return JobStatus(status_from_exit_code(text), "", f"qstat does not know {job_id}; its exit record {path} contains {text!r}")
