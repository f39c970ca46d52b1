"""A PBS Pro command front (qsub, qstat, qdel) that runs its jobs on a local Slurm cluster.

The tests put tests/cluster/pbs on PATH so that profiles/pbs submits to a real scheduler. The
front accepts the PBS Pro syntax that the profile uses, checks it the way PBS Pro's qsub and
server do, and rejects the rest with PBS Pro's messages and exit statuses. A PBS error exits with
its PBSE_* number modulo 256 (PBSE_UNKJOBID 15001 -> 153), because qsub, qstat and qdel pass
that number to exit(). Option errors and usage texts follow OpenPBS src/cmds/qsub.c and qdel.c,
error numbers src/include/pbs_error.h, and Exit_status codes src/include/job.h. The server's
messages (Unknown queue, Unknown resource Resource_List.X, Unknown Job Id, ...) are worded as
PBS Pro installations print them. Valid PBS syntax that the front does not translate is rejected
with a message that names the front, so a test never passes on syntax the front ignored.

Each accepted job becomes one `sbatch` job. The PBS job id is "<Slurm job id>.<server>", and
the front stores one JSON record per job under PBS_FRONT_HOME/jobs plus one line per command in
PBS_FRONT_HOME/calls.log. qstat reads the Slurm state from `scontrol show job`, which keeps
finished jobs for MinJobAge (tests/cluster/slurm-up.sh sets an hour).

Environment:
    PBS_FRONT_HOME    state folder (default /tmp/pbs-front-<uid>)
    PBS_FRONT_SERVER  server name in job ids (default pbs-test)
"""

from __future__ import annotations

import base64
import getopt
import json
import math
import os
import pwd
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

SERVER = os.environ.get("PBS_FRONT_SERVER", "pbs-test")
HOME = Path(os.environ.get("PBS_FRONT_HOME", f"/tmp/pbs-front-{os.getuid()}"))

# PBS error numbers (src/include/pbs_error.h). Commands exit with the number modulo 256.
PBSE_UNKJOBID = 15001
PBSE_BADATVAL = 15014
PBSE_UNKQUE = 15018
PBSE_UNKRESC = 15035
PBSE_EXCQRESC = 15036
PBSE_HISTJOBID = 15139

# Exit_status values that PBS Pro's MOM sets (src/include/job.h) and the offset PBS adds to a
# signal number when the job's top shell is killed by that signal.
JOB_EXEC_FAIL1 = -1
JOB_EXEC_KILL_MEM = -27
JOB_EXEC_KILL_WALLTIME = -29
SIGNAL_EXIT_OFFSET = 256

# Maximum job name length (PBS_MAXJOBNAME in OpenPBS src/include/pbs_ifl.h).
MAX_JOB_NAME = 236

QSUB_USAGE = """\
usage: qsub [-a date_time] [-A account_string] [-c interval]
\t[-C directive_prefix] [-e path] [-f ] [-h ] [-I [-X]] [-j oe|eo] [-J X-Y[:Z]]
\t[-k keep] [-l resource_list] [-m mail_options] [-M user_list]
\t[-N jobname] [-o path] [-p priority] [-P project] [-q queue] [-r y|n]
\t[-R o|e|oe] [-S path] [-u user_list] [-W otherattributes=value...]
\t[-v variable_list] [-V ] [-z] [script | -- command [arg1 ...]]
       qsub --version
"""
# PBS Pro's option string; the front translates the options in QSUB_SUPPORTED.
QSUB_GETOPT = "a:A:c:C:e:fhIj:J:k:l:m:M:N:o:p:q:r:R:S:u:v:VW:XzP:"
QSUB_SUPPORTED = {"-A", "-e", "-j", "-l", "-N", "-o", "-q", "-v", "-V"}

QSTAT_USAGE = """\
usage:
\tqstat [-f] [-J] [-p] [-t] [-x] [-E] [-F format | -w] [-D delim] [ job_identifier... | destination... ]
\tqstat [-a|-i|-r|-H|-T] [-J] [-t] [-u user] [-n] [-s] [-G|-M] [-1] [-w]
\t\t[ job_identifier... | destination... ]
\tqstat -Q [-f] [-F format] [-D delim] [ destination... ]
\tqstat -q [-G|-M] [ destination... ]
\tqstat -B [-f] [-F format] [-D delim] [ server_name... ]
\tqstat --version
"""
QSTAT_GETOPT = "1aBD:EfF:GHiJMnpQqrsTtu:wx"
QSTAT_SUPPORTED = {"-f", "-F", "-x"}

QDEL_USAGE = """\
usage:
\tqdel [-W force|suppress_email=X] [-x] job_identifier...
\tqdel --version
"""
QDEL_GETOPT = "W:x"

# Job-wide resources the front translates or records, and chunk resources inside select=.
JOB_RESOURCES = {"select", "walltime", "filesystems", "place"}
CHUNK_RESOURCES = {"ncpus", "ngpus", "mem", "system", "mpiprocs", "ompthreads"}
# Built-in PBS Pro job-wide resources that the front does not translate.
UNSUPPORTED_JOB_RESOURCES = {"ncpus", "mem", "nodes", "cput", "pcput", "pmem", "pvmem", "vmem", "software", "host"}

RESOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*$")
FILESYSTEM_LIST = re.compile(r"[A-Za-z0-9_]+(:[A-Za-z0-9_]+)*$")
SYSTEM_NAME = re.compile(r"[A-Za-z0-9_.-]+$")
# PBS size values: an integer with an optional unit b, kb, mb, gb, tb, pb (any case).
SIZE = re.compile(r"(\d+)([kmgtp]?b)?$", re.IGNORECASE)
SIZE_FACTOR_MB = {"b": 1 / 2**20, "kb": 1 / 2**10, "mb": 1, "gb": 2**10, "tb": 2**20, "pb": 2**30}
PLACE_WORDS = {"free", "pack", "scatter", "vscatter", "excl", "shared", "exclhost"}


class PbsError(Exception):
    """A rejected command: the message PBS prints on stderr and the exit status it returns."""

    def __init__(self, message: str, status: int, usage: str = ""):
        super().__init__(message)
        self.message = message
        self.status = status
        self.usage = usage


def pbs_exit_status(pbs_errno: int) -> int:
    """Return the exit status a PBS command shows for an error number (exit() keeps 8 bits)."""
    return pbs_errno % 256


def unsupported(command: str, syntax: str) -> PbsError:
    """Return the error for valid PBS Pro syntax that the front does not translate."""
    return PbsError(f"{command}: {syntax} is not supported by the test front in tests/cluster/pbs "
                    "(valid PBS Pro syntax)", 2)


def log_call(command: str, argv: list[str], status: int, output: str) -> None:
    """Append one JSON line per command to calls.log, so tests can see what the profile ran."""
    HOME.mkdir(parents=True, exist_ok=True)
    record = {"time": time.time(), "command": command, "argv": argv, "cwd": os.getcwd(),
              "status": status, "output": output.strip()}
    with open(HOME / "calls.log", "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def run_command(command: str, main, argv: list[str]) -> int:
    """Run main(argv), print its output or PBS error, log the call and return the exit status."""
    try:
        output = main(argv)
        status = 0
        if output:
            sys.stdout.write(output)
    except PbsError as error:
        output = error.message
        status = error.status
        if error.message:
            sys.stderr.write(error.message + "\n")
        if error.usage:
            sys.stderr.write(error.usage)
    log_call(command, argv, status, output)
    return status


# --- qsub ---------------------------------------------------------------------------------


def parse_walltime(value: str) -> int:
    """Return seconds for a PBS time value: [[hours:]minutes:]seconds, each field an integer.

    Minutes and seconds after the first field must be below 60. Raises ValueError otherwise.
    """
    fields = value.split(":")
    if len(fields) > 3 or not all(field.isdigit() for field in fields):
        raise ValueError(value)
    numbers = [int(field) for field in fields]
    if any(number >= 60 for number in numbers[1:]):
        raise ValueError(value)
    seconds = 0
    for number in numbers:
        seconds = seconds * 60 + number
    return seconds


def parse_size_mb(value: str) -> int:
    """Return whole MiB (rounded up) for a PBS size such as 4gb or 512mb."""
    match = SIZE.match(value)
    if not match:
        raise ValueError(value)
    unit = (match.group(2) or "b").lower()
    return max(1, math.ceil(int(match.group(1)) * SIZE_FACTOR_MB[unit]))


def split_resource_list(value: str) -> list[tuple[str, str]]:
    """Split one -l value, name=value[,name=value...], as qsub's set_resources does.

    Raises PbsError "illegal -l value" on a syntax error, before any name is checked.
    """
    illegal = PbsError("qsub: illegal -l value", 2, QSUB_USAGE)
    pairs = []
    for item in value.split(","):
        name, equals, setting = item.partition("=")
        if not equals or not RESOURCE_NAME.match(name) or not setting:
            raise illegal
        pairs.append((name, setting))
    return pairs


def bad_value(resource: str) -> PbsError:
    return PbsError(f"qsub: Illegal attribute or resource value Resource_List.{resource}",
                    pbs_exit_status(PBSE_BADATVAL))


def parse_select(value: str) -> dict:
    """Parse select=[N:]res=value[:res=value...] into {"chunks": N, resource: value}.

    The front runs single-chunk, single-node jobs, so several chunks (+) or N > 1 are rejected.
    """
    if "+" in value:
        raise unsupported("qsub", f"a select with several chunk types ({value})")
    parts = value.split(":")
    chunks = 1
    if parts[0].isdigit():
        chunks = int(parts.pop(0))
    if chunks < 1:
        raise bad_value("select")
    if chunks > 1:
        raise unsupported("qsub", f"select={value} ({chunks} chunks; the test cluster has one node)")
    chunk: dict = {"chunks": chunks}
    for part in parts:
        name, equals, setting = part.partition("=")
        if not equals or not RESOURCE_NAME.match(name) or not setting:
            raise bad_value("select")
        if name not in CHUNK_RESOURCES:
            # NOTE: the wording for an unknown resource inside a chunk follows the job-wide form;
            # a real server may phrase it differently.
            raise PbsError(f"qsub: Unknown resource {name}", pbs_exit_status(PBSE_UNKRESC))
        if name in ("ncpus", "mpiprocs", "ompthreads"):
            if not setting.isdigit() or int(setting) < 1:
                raise bad_value("select")
            chunk[name] = int(setting)
        elif name == "ngpus":
            if not setting.isdigit():
                raise bad_value("select")
            chunk[name] = int(setting)
        elif name == "mem":
            try:
                chunk["mem_mb"] = parse_size_mb(setting)
            except ValueError:
                raise bad_value("select") from None
            chunk[name] = setting
        elif name == "system":
            if not SYSTEM_NAME.match(setting):
                raise bad_value("select")
            chunk[name] = setting
    return chunk


def parse_place(value: str) -> str:
    for word in value.split(":"):
        if word not in PLACE_WORDS and not word.startswith("group="):
            raise bad_value("place")
    return value


def slurm_partitions() -> tuple[list[str], str | None]:
    """Return the Slurm partitions, which are the front's queues, and the default one."""
    result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    if result.returncode != 0:
        raise PbsError(f"qsub: cannot connect to server {SERVER} (errno=15010): sinfo failed: "
                       f"{result.stderr.strip()}", 1)
    names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    default = next((name.rstrip("*") for name in names if name.endswith("*")), None)
    return [name.rstrip("*") for name in names], default


def parse_destination(value: str) -> str:
    """Return the queue of a -q destination: queue, queue@server or @server."""
    queue, _, server = value.partition("@")
    if server and server != SERVER:
        raise PbsError(f"qsub: cannot connect to server {server} (errno=15010)", 1)
    return queue


def absolute_output_path(value: str, cwd: str) -> str:
    """Return the local path of a -o/-e value, which PBS accepts as [host:]path."""
    host, colon, path = value.rpartition(":")
    if colon and host and host not in (socket.gethostname(), "localhost"):
        raise unsupported("qsub", f"an output path on another host ({value})")
    path = path if colon else value
    return os.path.normpath(os.path.join(cwd, path))


def deliverable(path: str, suffix: str) -> str:
    """Return where Slurm writes a job's output (suffix OU) or error (ER) file.

    PBS copies these files to their -o/-e paths when the job ends and keeps them as
    $PBS_HOME/undelivered/<sequence>.OU or .ER when the folder does not exist, while the job still
    succeeds. Slurm would fail the job instead, so a missing folder becomes
    PBS_FRONT_HOME/undelivered.
    """
    if Path(path).parent.is_dir():
        return path
    undelivered = HOME / "undelivered"
    undelivered.mkdir(parents=True, exist_ok=True)
    return str(undelivered / f"%j.{suffix}")


def parse_qsub(argv: list[str]) -> dict:
    """Parse and check a qsub command line; return the job request or raise PbsError."""
    try:
        options, operands = getopt.getopt(argv, QSUB_GETOPT)
    except getopt.GetoptError as error:
        flag = f" -- '{error.opt}'" if error.opt else ""
        raise PbsError(f"qsub: invalid option{flag}", 2, QSUB_USAGE) from None

    request: dict = {"account": None, "queue": None, "name": None, "output": None, "error": None,
                     "join": "n", "variables": {}, "export_all": False, "resources": {}}
    for flag, value in options:
        if flag not in QSUB_SUPPORTED:
            raise unsupported("qsub", f"option {flag}")
        if flag == "-A":
            request["account"] = value
        elif flag == "-q":
            request["queue"] = parse_destination(value)
        elif flag == "-N":
            if not value or len(value) > MAX_JOB_NAME or any(char.isspace() for char in value):
                raise PbsError("qsub: illegal -N value", 2, QSUB_USAGE)
            request["name"] = value
        elif flag == "-o":
            request["output"] = value
        elif flag == "-e":
            request["error"] = value
        elif flag == "-j":
            if value not in ("oe", "eo", "n"):
                raise PbsError("qsub: illegal -j value", 2, QSUB_USAGE)
            request["join"] = value
        elif flag == "-V":
            request["export_all"] = True
        elif flag == "-v":
            for item in value.split(","):
                variable, equals, setting = item.partition("=")
                if not variable:
                    raise PbsError("qsub: illegal -v value", 2, QSUB_USAGE)
                if not equals:
                    if variable not in os.environ:
                        raise PbsError("qsub: cannot send environment with the job", 1)
                    setting = os.environ[variable]
                request["variables"][variable] = setting
        elif flag == "-l":
            for name, setting in split_resource_list(value):
                request["resources"][name] = setting

    # getopt drops the "--" that ends the options, so look at the argument before the operands.
    if len(operands) < len(argv) and argv[len(argv) - len(operands) - 1] == "--":
        raise unsupported("qsub", "an executable after '--' instead of a job script")
    if len(operands) > 1:
        raise PbsError("", 2, QSUB_USAGE)
    if not operands:
        raise unsupported("qsub", "a job script read from standard input")
    request["script"] = operands[0]
    return request


def check_resources(resources: dict) -> dict:
    """Check the -l resources as the PBS server would; return the parsed values."""
    checked: dict = {}
    for name, value in resources.items():
        if name in UNSUPPORTED_JOB_RESOURCES:
            raise unsupported("qsub", f"-l {name}=")
        if name not in JOB_RESOURCES:
            raise PbsError(f"qsub: Unknown resource Resource_List.{name}", pbs_exit_status(PBSE_UNKRESC))
        if name == "walltime":
            try:
                checked["walltime_s"] = parse_walltime(value)
            except ValueError:
                raise bad_value("walltime") from None
        elif name == "select":
            checked["select"] = parse_select(value)
        elif name == "filesystems":
            if not FILESYSTEM_LIST.match(value):
                raise bad_value("filesystems")
        elif name == "place":
            parse_place(value)
    checked.setdefault("select", {"chunks": 1})
    return checked


def read_script(path: str) -> bytes:
    """Read the job script as qsub does: it must be a regular file and is copied at submission."""
    script = Path(path)
    if not script.exists():
        raise PbsError("qsub: script file:: No such file or directory", 1)
    if not script.is_file():
        raise PbsError("qsub: script not a file", 1)
    content = script.read_bytes()
    for line in content.decode(errors="replace").splitlines():
        if line.startswith("#PBS"):
            raise unsupported("qsub", f"a #PBS directive in the job script ({line.strip()})")
    return content


def pbs_environment(request: dict, queue: str, cwd: str) -> dict[str, str]:
    """Return the variables PBS Pro adds to a job: PBS_O_* from qsub's environment and -v/-V."""
    environment = {}
    if request["export_all"]:
        environment.update({key: value for key, value in os.environ.items() if not key.startswith("PBS_O_")})
    for name in ("HOME", "LANG", "LOGNAME", "PATH", "MAIL", "SHELL", "TZ"):
        if name in os.environ:
            environment[f"PBS_O_{name}"] = os.environ[name]
    environment.update({
        "PBS_O_WORKDIR": cwd,
        "PBS_O_HOST": socket.gethostname(),
        "PBS_O_QUEUE": queue,
        "PBS_O_SYSTEM": os.uname().sysname,
        "PBS_SERVER": SERVER,
        "PBS_JOBNAME": request["name"],
        "PBS_QUEUE": queue,
        "PBS_ENVIRONMENT": "PBS_BATCH",
    })
    environment.update(request["variables"])
    return environment


def wrapper_script(script: bytes, environment: dict[str, str], job_shell: str) -> str:
    """Return the Slurm batch script that runs a PBS job script the way PBS Pro's MOM does.

    The job starts in the home folder with a login environment (sbatch --export=NONE) plus the
    PBS variables, and the user's login shell runs the copy of the script that qsub took.
    """
    lines = ["#!/bin/bash", "# Written by tests/cluster/pbs/qsub: runs one PBS job script on Slurm."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(environment.items())]
    lines += [
        f'export PBS_JOBID="${{SLURM_JOB_ID}}.{SERVER}"',
        'export PBS_JOBDIR="$HOME"',
        'PBS_NODEFILE=$(mktemp "${TMPDIR:-/tmp}/pbs-nodefile.XXXXXX")',
        'hostname > "$PBS_NODEFILE"',
        "export PBS_NODEFILE",
        'script=$(mktemp "${TMPDIR:-/tmp}/pbs-script.XXXXXX")',
        # Slurm ends a job with SIGTERM (time limit, scancel); the TERM trap exits, so the
        # EXIT trap removes the temporary files in that case too.
        'trap \'rm -f "$script" "$PBS_NODEFILE"\' EXIT',
        "trap 'exit 143' TERM",
        f"echo {base64.b64encode(script).decode()} | base64 -d > \"$script\"",
        # Remove Slurm's variables, so the job script finds only PBS ones, as on a PBS cluster.
        'for name in $(compgen -e | grep -E "^SLURMD?_"); do unset "$name"; done',
        'cd "$HOME"',
        f'{shlex.quote(job_shell)} "$script"',
    ]
    return "\n".join(lines) + "\n"


def job_record_path(sequence: str) -> Path:
    return HOME / "jobs" / f"{sequence}.json"


def qsub(argv: list[str]) -> str:
    """Submit one PBS job to Slurm and return its PBS job id line."""
    request = parse_qsub(argv)
    resources = check_resources(request["resources"])
    queues, default_queue = slurm_partitions()
    queue = request["queue"] or default_queue
    if queue not in queues:
        raise PbsError("qsub: Unknown queue", pbs_exit_status(PBSE_UNKQUE))

    script = read_script(request["script"])
    cwd = os.getcwd()
    if request["name"] is None:
        request["name"] = Path(request["script"]).name[:MAX_JOB_NAME]
    name = request["name"]
    chunk = resources["select"]
    ncpus = chunk.get("ncpus", 1)

    # PBS writes <name>.o<sequence> and <name>.e<sequence> in the submission folder by default.
    output = absolute_output_path(request["output"] or f"{name}.o%j", cwd)
    error = absolute_output_path(request["error"] or f"{name}.e%j", cwd)
    command = ["sbatch", "--parsable", "--export=NONE", f"--job-name={name}", f"--partition={queue}",
               "--nodes=1", "--ntasks=1", f"--cpus-per-task={ncpus}", f"--chdir={Path.home()}"]
    if request["join"] == "oe":
        command.append(f"--output={deliverable(output, 'OU')}")
    elif request["join"] == "eo":
        command.append(f"--output={deliverable(error, 'ER')}")
    else:
        command += [f"--output={deliverable(output, 'OU')}", f"--error={deliverable(error, 'ER')}"]
    if request["account"]:
        command.append(f"--account={request['account']}")
    if "walltime_s" in resources:
        # NOTE: Slurm keeps time limits in whole minutes and checks them about every 30 s, so a
        # job is killed up to about half a minute after PBS would kill it.
        command.append(f"--time={max(1, math.ceil(resources['walltime_s'] / 60))}")
    if "mem_mb" in chunk:
        command.append(f"--mem={chunk['mem_mb']}")
    # ngpus is recorded for qstat but not requested: the test node has no GPUs.

    job_shell = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    batch = wrapper_script(script, pbs_environment(request, queue, cwd), job_shell)
    result = subprocess.run(command, input=batch, capture_output=True, text=True)
    if result.returncode != 0:
        message = result.stderr.strip()
        if "Requested node configuration is not available" in message or "memory" in message.lower():
            raise PbsError("qsub: Job violates queue and/or server resource limits",
                           pbs_exit_status(PBSE_EXCQRESC))
        raise PbsError(f"qsub: the Slurm backend rejected the job: {message}", 1)
    sequence = result.stdout.strip().split(";")[0]
    job_id = f"{sequence}.{SERVER}"

    record = {
        "id": job_id, "slurm_id": sequence, "name": name, "queue": queue,
        "account": request["account"], "owner": f"{pwd.getpwuid(os.getuid()).pw_name}@{socket.gethostname()}",
        "resources": request["resources"], "ncpus": ncpus, "ngpus": chunk.get("ngpus", 0),
        "output_path": output.replace("%j", sequence), "error_path": error.replace("%j", sequence),
        "join": request["join"], "script": str(Path(cwd, request["script"])), "workdir": cwd,
        "submit_arguments": argv, "sbatch": command, "qtime": time.time(),
    }
    job_record_path(sequence).parent.mkdir(parents=True, exist_ok=True)
    job_record_path(sequence).write_text(json.dumps(record, indent=1))
    return job_id + "\n"


# --- qstat and qdel -----------------------------------------------------------------------


def find_record(job_id: str, command: str) -> dict:
    """Return the stored record of a PBS job id, given with or without the server suffix."""
    sequence, _, server = job_id.partition(".")
    if not sequence.isdigit():
        raise PbsError(f"{command}: illegally formed job identifier: {job_id}", 1)
    path = job_record_path(sequence)
    if (server and server != SERVER) or not path.is_file():
        # PBS names the job with the default server added, as in "Unknown Job Id 12.server".
        raise PbsError(f"{command}: Unknown Job Id {sequence}.{server or SERVER}", pbs_exit_status(PBSE_UNKJOBID))
    return json.loads(path.read_text())


def slurm_job(record: dict) -> dict | None:
    """Return `scontrol show job` fields of the record's Slurm job, or None once Slurm purged it."""
    result = subprocess.run(["scontrol", "show", "job", "-o", record["slurm_id"]],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise PbsError(f"pbs front: scontrol failed: {result.stderr.strip()}", 1)
    # One line of Key=Value pairs; values that contain spaces (Command=, WorkDir=) are not used.
    return dict(re.findall(r"(\S+?)=(\S*)", result.stdout))


def pbs_state(fields: dict) -> str:
    state = fields["JobState"]
    if state == "PENDING":
        return "H" if "Held" in fields.get("Reason", "") else "Q"
    if state in ("RUNNING", "CONFIGURING"):
        return "R"
    if state == "COMPLETING":
        return "E"
    if state == "SUSPENDED":
        return "S"
    if state in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
        return "Q"
    return "F"


def pbs_exit(fields: dict) -> int:
    """Return PBS Pro's Exit_status for a finished Slurm job."""
    state = fields["JobState"]
    code, _, signal = fields.get("ExitCode", "0:0").partition(":")
    if state == "TIMEOUT":
        return JOB_EXEC_KILL_WALLTIME
    if state == "OUT_OF_MEMORY":
        return JOB_EXEC_KILL_MEM
    if state == "CANCELLED":
        # qdel ends a running job with SIGTERM, which PBS reports as 256 + 15.
        return SIGNAL_EXIT_OFFSET + 15
    if state in ("NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
        return JOB_EXEC_FAIL1
    if int(signal or 0):
        return SIGNAL_EXIT_OFFSET + int(signal)
    return int(code or 0)


def pbs_time(slurm_time: str) -> str | None:
    """Convert Slurm's 2026-12-04T20:29:35 into PBS's ctime form, Fri Dec  4 20:29:35 2026."""
    try:
        return time.ctime(time.mktime(time.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def qstat_job(record: dict, fields: dict) -> dict:
    """Return the qstat -f -F json attributes of one job."""
    state = pbs_state(fields)
    resource_list = {"ncpus": record["ncpus"], "ngpus": record["ngpus"], "nodect": 1}
    for name, value in record["resources"].items():
        resource_list[name] = value
    job = {
        "Job_Name": record["name"],
        "Job_Owner": record["owner"],
        "job_state": state,
        "queue": record["queue"],
        "server": SERVER,
        "Account_Name": record["account"],
        "Output_Path": f"{socket.gethostname()}:{record['output_path']}",
        "Error_Path": f"{socket.gethostname()}:{record['error_path']}",
        "Join_Path": record["join"],
        "Resource_List": resource_list,
        "ctime": time.ctime(record["qtime"]),
        "qtime": time.ctime(record["qtime"]),
        "jobdir": str(Path.home()),
        "Submit_arguments": " ".join(shlex.quote(argument) for argument in record["submit_arguments"]),
        "Variable_List": {"PBS_O_WORKDIR": record["workdir"], "PBS_O_QUEUE": record["queue"]},
        "substate": {"Q": 10, "H": 20, "R": 42, "E": 50, "S": 43, "F": 92}[state],
        "comment": f"Slurm job {record['slurm_id']}: {fields['JobState']} ({fields.get('Reason', 'None')})",
    }
    if record["account"] is None:
        del job["Account_Name"]
    if state in ("R", "E", "F") and pbs_time(fields.get("StartTime", "")):
        job["stime"] = pbs_time(fields["StartTime"])
        job["exec_host"] = f"{fields.get('BatchHost', 'unknown')}/0*{record['ncpus']}"
        job["resources_used"] = {"cpupercent": 0, "cput": "00:00:00", "mem": "0kb",
                                 "ncpus": record["ncpus"], "vmem": "0kb",
                                 "walltime": fields.get("RunTime", "00:00:00")}
    if state == "F":
        job["Exit_status"] = pbs_exit(fields)
        if pbs_time(fields.get("EndTime", "")):
            job["obittime"] = pbs_time(fields["EndTime"])
        if job["Exit_status"] != 0:
            job["substate"] = 93
    return job


def parse_options(command: str, argv: list[str], optstring: str, supported: set[str], usage: str):
    try:
        options, operands = getopt.getopt(argv, optstring)
    except getopt.GetoptError as error:
        flag = f" -- '{error.opt}'" if error.opt else ""
        raise PbsError(f"{command}: invalid option{flag}", 2, usage) from None
    for flag, _ in options:
        if flag not in supported:
            raise unsupported(command, f"option {flag}")
    return dict(options), operands


def qstat(argv: list[str]) -> str:
    """Print the full status of jobs as qstat -f -F json [-x] does."""
    options, job_ids = parse_options("qstat", argv, QSTAT_GETOPT, QSTAT_SUPPORTED, QSTAT_USAGE)
    if "-f" not in options or options.get("-F") != "json" or not job_ids:
        raise unsupported("qstat", "a request other than 'qstat [-x] -f -F json job_identifier...'")

    jobs = {}
    errors = []
    status = 0
    for job_id in job_ids:
        try:
            record = find_record(job_id, "qstat")
            fields = slurm_job(record)
            if fields is None:
                raise PbsError(f"qstat: Unknown Job Id {record['id']}", pbs_exit_status(PBSE_UNKJOBID))
            job = qstat_job(record, fields)
            if job["job_state"] == "F" and "-x" not in options:
                raise PbsError(f"qstat: {record['id']} Job has finished, use -x or -H to obtain "
                               "historical job information", pbs_exit_status(PBSE_HISTJOBID))
            jobs[record["id"]] = job
        except PbsError as error:
            errors.append(error.message)
            status = error.status

    document = {"timestamp": int(time.time()), "pbs_version": "test-front", "pbs_server": SERVER}
    if jobs:
        document["Jobs"] = jobs
    output = json.dumps(document, indent=4) + "\n" if jobs else ""
    if errors:
        sys.stdout.write(output)
        raise PbsError("\n".join(errors), status)
    return output


def qdel(argv: list[str]) -> str:
    """Delete jobs with scancel, as qdel job_identifier... does."""
    options, job_ids = parse_options("qdel", argv, QDEL_GETOPT, set(), QDEL_USAGE)
    if not job_ids:
        raise PbsError("", 2, QDEL_USAGE)
    errors = []
    status = 0
    for job_id in job_ids:
        try:
            record = find_record(job_id, "qdel")
            fields = slurm_job(record)
            if fields is None:
                raise PbsError(f"qdel: Unknown Job Id {record['id']}", pbs_exit_status(PBSE_UNKJOBID))
            if pbs_state(fields) == "F":
                raise PbsError(f"qdel: Job has finished {record['id']}", pbs_exit_status(PBSE_HISTJOBID))
            result = subprocess.run(["scancel", record["slurm_id"]], capture_output=True, text=True)
            if result.returncode != 0:
                raise PbsError(f"qdel: scancel {record['slurm_id']} failed: {result.stderr.strip()}", 1)
        except PbsError as error:
            errors.append(error.message)
            status = error.status
    if errors:
        raise PbsError("\n".join(errors), status)
    return ""


COMMANDS = {"qsub": qsub, "qstat": qstat, "qdel": qdel}


def main(command: str) -> int:
    """Entry point of the qsub, qstat and qdel scripts beside this module."""
    argv = sys.argv[1:]
    if argv == ["--version"]:
        print("pbs_version = test-front (tests/cluster/pbs, runs jobs on Slurm)")
        return 0
    return run_command(command, COMMANDS[command], argv)
