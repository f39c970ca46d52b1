"""Runs on a real scheduler: a one-node Slurm cluster on this host, and the PBS Pro command front
in tests/cluster/pbs, which turns qsub, qstat and qdel into Slurm jobs.

Start the cluster first, as root: `tests/cluster/slurm-up.sh`. Without a responding controller
these tests are skipped, except under CI=true, where a missing scheduler fails them.

The file takes about 4.5 minutes on 2 CPU cores. Most of it is the failure cases, which run
side by side and wait for Slurm to enforce a one-minute time limit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "tests" / "cluster"
PBS_FRONT = CLUSTER / "pbs"
PROFILES = REPO / "profiles"
SLURM_PROFILE = PROFILES / "slurm"
PBS_PROFILE = PROFILES / "pbs"
SERVER = "pbs-test"

# Fast codec levels, as in test_workflow.py: these runs check the scheduling, not the ratios.
FAST_CODECS = {"gzip": 1, "bz2": 1, "xz": 0, "zstd": 1}
# Limit for one snakemake run through a scheduler, in seconds.
RUN_TIMEOUT = 300

# The Polaris-style request that profiles/pbs sends, as one qsub command line.
POLARIS_QSUB = [
    "-A", "myproj", "-q", "debug",
    "-l", "select=1:ncpus=2:ngpus=1:system=polaris",
    "-l", "walltime=00:10:00",
    "-l", "filesystems=home:eagle",
    "-N", "lmprune.prune",
    "-o", "logs/pbs/x.out", "-e", "logs/pbs/x.err",
]


# --- scheduler access -----------------------------------------------------------------------


def scheduler_problem() -> str | None:
    """Return why the Slurm cluster cannot run jobs, or None when it can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client tools (sinfo, sbatch) not found; run tests/cluster/slurm-up.sh as root"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out after 30 s; run tests/cluster/slurm-up.sh as root"
    if "is UP" not in ping.stdout:
        first_line = (ping.stdout + ping.stderr).strip().splitlines()[:1]
        return f"Slurm controller not responding ({' '.join(first_line)}); run tests/cluster/slurm-up.sh as root"
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.split()
    if not set(states) & {"idle", "mixed", "allocated", "completing"}:
        return f"no Slurm node is up (node states: {states}); see 'sinfo -R'"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = scheduler_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true needs a running scheduler: {problem}")
    pytest.skip(problem)


def slurm_job(job_id: str) -> dict[str, str]:
    """Return the Key=Value fields of `scontrol show job -o` for one Slurm job."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\S+?)=(\S*)", result.stdout))


def wait_for(condition, timeout: float, description: str, interval: float = 1.0):
    """Call condition() until it returns a true value and return that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {description}")


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_slurm_finished(job_id: str, timeout: float = 120) -> dict[str, str]:
    def finished():
        fields = slurm_job(job_id)
        return fields if fields["JobState"] in FINISHED else None

    return wait_for(finished, timeout, f"Slurm job {job_id} to finish")


# --- PBS front ------------------------------------------------------------------------------


@pytest.fixture
def front_env(tmp_path) -> dict[str, str]:
    """Environment with the PBS front first on PATH and its state in a fresh folder."""
    return {
        **os.environ,
        "PATH": f"{PBS_FRONT}{os.pathsep}{os.environ['PATH']}",
        "PBS_FRONT_HOME": str(tmp_path / "pbs-front"),
        "PBS_FRONT_SERVER": SERVER,
    }


def front_calls(env: dict[str, str], command: str | None = None) -> list[dict]:
    """Return the front's call records (argv, status, output), optionally of one command."""
    log = Path(env["PBS_FRONT_HOME"]) / "calls.log"
    if not log.is_file():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [record for record in records if command in (None, record["command"])]


def front_records(env: dict[str, str]) -> dict[str, dict]:
    """Return the front's job records by PBS job id."""
    folder = Path(env["PBS_FRONT_HOME"]) / "jobs"
    records = [json.loads(path.read_text()) for path in folder.glob("*.json")] if folder.is_dir() else []
    return {record["id"]: record for record in records}


def run_front(command: str, *arguments: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([command, *arguments], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def qstat_job(job_id: str, env: dict[str, str], cwd: Path) -> dict:
    result = run_front("qstat", "-x", "-f", "-F", "json", job_id, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["Jobs"][job_id]


def wait_pbs_finished(job_id: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> dict:
    def finished():
        job = qstat_job(job_id, env, cwd)
        return job if job["job_state"] == "F" else None

    return wait_for(finished, timeout, f"PBS job {job_id} to finish")


# --- snakemake through a profile ------------------------------------------------------------

# The profiles ask for up to 8 threads and 16 GB per job, more than the test node has (4 CPUs
# as slurm-up.sh declares them on a 2-core host). So every rule that the profiles size gets 1 or
# 2 threads and a few GB here. These options replace the profiles' set-threads, set-resources
# and default-resources for the run.
SMALL_NODE = [
    "--set-threads", "prune=2", "measure_size=1", "plot_histograms=2", "finetune_eval=2",
    "--set-resources", "prune:mem_mb=3000", "measure_size:mem_mb=2000", "plot_histograms:mem_mb=3000",
    "finetune_eval:mem_mb=4000", "finetune_eval:gpu=0",
    "--default-resources", "runtime=30", "mem_mb=2000", "gpu=0",
]


def scheduler_arguments(profile: Path) -> list[str]:
    """Return the overrides this test cluster needs on top of a profile.

    Two jobs at a time fit the test node. The status intervals only shorten the test: the
    profiles wait 30 s (PBS) and 40 s (the Slurm plugin's default) between checks. The shared
    folder is local, so outputs need no long latency wait.
    """
    arguments = ["--jobs", "2", "--latency-wait", "5"]
    if profile == SLURM_PROFILE:
        return [*arguments, "--slurm-init-seconds-before-status-checks", "2"]
    return [*arguments, "--seconds-between-status-checks", "2"]


def snakemake_command(workdir: Path, profile: Path, *arguments: str, snakefile: Path | None = None) -> list[str]:
    return [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(snakefile or REPO / "Snakefile"),
        "--directory", str(workdir),
        "--profile", str(profile),
        *arguments,
    ]


def profile_env(profile: Path, folder: Path) -> dict[str, str]:
    """Return the environment for snakemake runs through a profile, with their scheduler state
    in ``folder``.

    For profiles/pbs that is the PBS front on PATH, its state folder, and a site file (read
    through LMPRUNE_PBS_SITE) with a Polaris-style account, queue, filesystems and system.
    """
    environment = {key: value for key, value in os.environ.items() if key != "LMPRUNE_DATA_DIR"}
    environment.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if profile == PBS_PROFILE:
        site = folder / "pbs-site.yaml"
        site.write_text(yaml.safe_dump({
            "account": "myproj",
            "queue": "debug",
            "filesystems": "home:eagle",
            "system": "polaris",
            "memory": False,
            "setup": "export HF_HUB_OFFLINE=1\nexport HF_DATASETS_OFFLINE=1\n",
        }))
        environment.update({
            "PATH": f"{PBS_FRONT}{os.pathsep}{os.environ['PATH']}",
            "PBS_FRONT_HOME": str(folder / "pbs-front"),
            "PBS_FRONT_SERVER": SERVER,
            "LMPRUNE_PBS_SITE": str(site),
        })
    return environment


def run_profile(workdir: Path, profile: Path, *arguments: str, env: dict[str, str],
                snakefile: Path | None = None) -> subprocess.CompletedProcess:
    """Run snakemake through a cluster profile and return the finished process; raise if it failed."""
    command = snakemake_command(workdir, profile, *scheduler_arguments(profile), *arguments, snakefile=snakefile)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT)
    if result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def slurm_ids_in_log(text: str) -> list[str]:
    """Return the Slurm job ids that the slurm executor reports as submitted."""
    return re.findall(r"submitted with SLURM jobid (\d+)", text)


def pbs_ids_in_log(text: str) -> list[str]:
    """Return the external job ids that the cluster-generic executor reports as submitted."""
    return re.findall(r"with external jobid '([^']+)'", text)


def write_tiny_config(folder: Path, model: Path) -> Path:
    """Write a config with one untrained encoder at one sparsity and no benchmarks."""
    path = folder / "cluster-config.yaml"
    config = {
        "models": [{"name": "tiny-bert", "family": "encoder", "source": {"path": str(model)}}],
        "sparsities": [0.5],
        "sizes": {"codecs": FAST_CODECS},
        "tasks": [],
        "fidelity": {"enabled": False},
        "latency": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def check_tiny_outputs(workdir: Path):
    assert (workdir / "results/checkpoints/tiny-bert/magnitude/s50/model.safetensors").is_file()
    sizes = json.loads((workdir / "results/sizes/tiny-bert/magnitude/s50.json").read_text())
    assert sizes["untrained"] is True
    assert (workdir / "results/histograms/tiny-bert/magnitude/s50-layers.png").is_file()
    assert (workdir / "results/tables/sizes.csv").is_file()
    assert (workdir / "results/figures/size_vs_sparsity.png").is_file()


def profile_or_skip(profile: Path) -> Path:
    if not (profile / "config.yaml").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"profile {profile} not found")
        pytest.skip(f"profile {profile} not found")
    return profile


# --- 1. Slurm itself ------------------------------------------------------------------------


def test_sbatch_job_completes(tmp_path):
    output = tmp_path / "job.out"
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={output}", "--wrap", "echo ran on $(hostname)"],
        capture_output=True, text=True, check=True,
    )
    job_id = result.stdout.strip().split(";")[0]

    fields = wait_slurm_finished(job_id, timeout=60)

    assert fields["JobState"] == "COMPLETED"
    assert fields["ExitCode"] == "0:0"
    assert output.read_text().startswith("ran on ")


# --- 2. PBS front syntax --------------------------------------------------------------------


def test_qsub_polaris_request_runs(tmp_path, front_env):
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/sh\necho "job $PBS_JOBID from $PBS_O_WORKDIR in $(pwd)"\necho warning >&2\n')
    (tmp_path / "logs/pbs").mkdir(parents=True)

    submitted = run_front("qsub", *POLARIS_QSUB, "job.sh", env=front_env, cwd=tmp_path)

    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(rf"\d+\.{SERVER}", job_id)
    job = wait_pbs_finished(job_id, front_env, tmp_path)
    assert job["Exit_status"] == 0
    assert job["Job_Name"] == "lmprune.prune"
    assert job["Account_Name"] == "myproj"
    assert job["queue"] == "debug"
    assert job["Resource_List"]["ngpus"] == 1
    assert job["Resource_List"]["filesystems"] == "home:eagle"
    assert job["Resource_List"]["walltime"] == "00:10:00"

    # The PBS job is a real Slurm job with the translated request.
    fields = slurm_job(job_id.split(".")[0])
    assert fields["JobName"] == "lmprune.prune"
    assert fields["Account"] == "myproj"
    assert fields["Partition"] == "debug"
    assert fields["TimeLimit"] == "00:10:00"
    assert fields["NumCPUs"] == "2"
    # PBS starts jobs in the home folder, with the submission folder in PBS_O_WORKDIR.
    assert (tmp_path / "logs/pbs/x.out").read_text() == f"job {job_id} from {tmp_path} in {Path.home()}\n"
    assert (tmp_path / "logs/pbs/x.err").read_text() == "warning\n"


USAGE = "usage: qsub"

# qsub arguments before the script, the first stderr line PBS Pro prints, its exit status, and
# whether the usage text follows.
REJECTED_QSUB = {
    "walltime with unit": (["-l", "walltime=10min"], "qsub: Illegal attribute or resource value Resource_List.walltime", 166, False),
    "walltime minutes over 59": (["-l", "walltime=00:61:00"], "qsub: Illegal attribute or resource value Resource_List.walltime", 166, False),
    "unknown resource": (["-l", "gpus=1"], "qsub: Unknown resource Resource_List.gpus", 187, False),
    "unknown chunk resource": (["-l", "select=1:cpus=2"], "qsub: Unknown resource cpus", 187, False),
    "chunk value not a number": (["-l", "select=1:ncpus=two"], "qsub: Illegal attribute or resource value Resource_List.select", 166, False),
    "resource without value": (["-l", "walltime"], "qsub: illegal -l value", 2, True),
    "empty filesystem name": (["-l", "filesystems=home::eagle"], "qsub: Illegal attribute or resource value Resource_List.filesystems", 166, False),
    "unknown queue": (["-q", "nosuch"], "qsub: Unknown queue", 170, False),
    "unknown option": (["-Z"], "qsub: invalid option -- 'Z'", 2, True),
    "job name with space": (["-N", "two words"], "qsub: illegal -N value", 2, True),
}


@pytest.mark.parametrize("arguments, message, status, usage", REJECTED_QSUB.values(), ids=REJECTED_QSUB.keys())
def test_qsub_rejects_malformed(tmp_path, front_env, arguments, message, status, usage):
    (tmp_path / "job.sh").write_text("#!/bin/sh\ntrue\n")

    result = run_front("qsub", *arguments, "job.sh", env=front_env, cwd=tmp_path)

    assert result.returncode == status
    assert result.stderr.splitlines()[0] == message
    assert (USAGE in result.stderr) == usage
    assert result.stdout == ""
    assert front_records(front_env) == {}


def test_qsub_rejects_missing_script(tmp_path, front_env):
    missing = run_front("qsub", "-q", "debug", "missing.sh", env=front_env, cwd=tmp_path)
    # Without a script real qsub would read one from stdin, which the front does not support.
    no_script = run_front("qsub", "-q", "debug", env=front_env, cwd=tmp_path)
    two_scripts = run_front("qsub", "job.sh", "other.sh", env=front_env, cwd=tmp_path)

    assert missing.returncode == 1
    assert missing.stderr == "qsub: script file:: No such file or directory\n"
    assert no_script.returncode == 2
    assert "standard input is not supported by the test front" in no_script.stderr
    assert two_scripts.returncode == 2
    assert two_scripts.stderr.startswith(USAGE)
    assert front_records(front_env) == {}


def test_qsub_rejects_unsupported_pbs_syntax(tmp_path, front_env):
    (tmp_path / "job.sh").write_text("#!/bin/sh\ntrue\n")

    interactive = run_front("qsub", "-I", "job.sh", env=front_env, cwd=tmp_path)
    two_chunks = run_front("qsub", "-l", "select=2:ncpus=1", "job.sh", env=front_env, cwd=tmp_path)

    assert interactive.returncode == 2
    assert "option -I is not supported by the test front" in interactive.stderr
    assert two_chunks.returncode == 2
    assert "2 chunks" in two_chunks.stderr
    assert front_records(front_env) == {}


def test_qstat_unknown_job_id(tmp_path, front_env):
    result = run_front("qstat", "-x", "-f", "-F", "json", f"999999.{SERVER}", env=front_env, cwd=tmp_path)

    assert result.returncode == 153
    assert result.stderr == f"qstat: Unknown Job Id 999999.{SERVER}\n"
    assert result.stdout == ""


def test_qdel_cancels_running_job(tmp_path, front_env):
    (tmp_path / "sleep.sh").write_text("#!/bin/sh\nsleep 300\n")
    job_id = run_front("qsub", "-l", "walltime=00:10:00", "sleep.sh", env=front_env, cwd=tmp_path).stdout.strip()
    wait_for(lambda: qstat_job(job_id, front_env, tmp_path)["job_state"] == "R", 60, f"{job_id} to run")

    deleted = run_front("qdel", job_id, env=front_env, cwd=tmp_path)
    job = wait_pbs_finished(job_id, front_env, tmp_path, timeout=60)
    again = run_front("qdel", job_id, env=front_env, cwd=tmp_path)
    without_history = run_front("qstat", "-f", "-F", "json", job_id, env=front_env, cwd=tmp_path)

    assert deleted.returncode == 0, deleted.stderr
    assert job["Exit_status"] == 271
    assert slurm_job(job_id.split(".")[0])["JobState"] == "CANCELLED"
    assert again.returncode == 35
    assert again.stderr == f"qdel: Job has finished {job_id}\n"
    assert without_history.returncode == 35
    assert "use -x or -H" in without_history.stderr


# --- 3. and 4. the tiny workflow through each profile ---------------------------------------


def test_workflow_through_slurm_profile(tmp_path, toy_models):
    profile = profile_or_skip(SLURM_PROFILE)
    config = write_tiny_config(tmp_path, toy_models["encoder"])

    result = run_profile(tmp_path, profile, *SMALL_NODE, "--configfile", str(config),
                         env=profile_env(profile, tmp_path))

    check_tiny_outputs(tmp_path)
    log = result.stdout + result.stderr
    slurm_ids = slurm_ids_in_log(log)
    # prune, measure_size and plot_histograms run on the cluster; the rest are local rules.
    assert len(slurm_ids) == 3, log[-3000:]
    comments = set()
    for job_id in slurm_ids:
        fields = slurm_job(job_id)
        assert fields["JobState"] == "COMPLETED"
        comments.add(fields["Comment"].split("_wildcards")[0])
    assert comments == {"rule_prune", "rule_measure_size", "rule_plot_histograms"}
    # The profile keeps every job's Slurm log under logs/slurm.
    assert len(list((tmp_path / "logs/slurm").rglob("*.log"))) == 3


def test_workflow_through_pbs_profile(tmp_path, toy_models):
    profile = profile_or_skip(PBS_PROFILE)
    config = write_tiny_config(tmp_path, toy_models["encoder"])
    env = profile_env(profile, tmp_path)

    result = run_profile(tmp_path, profile, *SMALL_NODE, "--configfile", str(config), env=env)

    check_tiny_outputs(tmp_path)
    log = result.stdout + result.stderr
    pbs_ids = pbs_ids_in_log(log)
    assert len(pbs_ids) == 3, log[-3000:]
    records = front_records(env)
    assert sorted(records) == sorted(pbs_ids)
    for job_id in pbs_ids:
        assert re.fullmatch(rf"\d+\.{SERVER}", job_id)
        assert slurm_job(records[job_id]["slurm_id"])["JobState"] == "COMPLETED"
        assert records[job_id]["account"] == "myproj"
        assert records[job_id]["queue"] == "debug"
        assert records[job_id]["resources"]["filesystems"] == "home:eagle"
        assert records[job_id]["resources"]["select"].endswith(":system=polaris")
    prune = next(record for record in records.values() if record["name"].startswith("prune."))
    assert prune["resources"]["select"] == "1:ncpus=2:system=polaris"
    assert prune["ncpus"] == 2
    # The front accepted every call, and each status query was the full JSON form.
    assert [call for call in front_calls(env) if call["status"] != 0] == []
    assert {tuple(call["argv"][:-1]) for call in front_calls(env, "qstat")} == {("-x", "-f", "-F", "json")}


# --- 5. failures: a walltime kill, and a killed snakemake -----------------------------------

# Sleeps through a one-minute walltime on its first attempt and finishes at once on the second,
# so a passing run shows that the kill was reported as a failure and the job retried.
WALLTIME_SNAKEFILE = """\
rule all:
    input:
        "out/slow.txt",

rule slow:
    output:
        "out/slow.txt",
    resources:
        runtime=lambda wildcards, attempt: 1 if attempt == 1 else 5,
        nap_seconds=lambda wildcards, attempt: 600 if attempt == 1 else 0,
        try_number=lambda wildcards, attempt: attempt,
    shell:
        "echo attempt {resources.try_number} >> attempts.log; "
        "sleep {resources.nap_seconds}; "
        "echo done > {output}"
"""

# A chain quick -> slow -> last. The slow job writes the first line of its output, sleeps, then
# writes the second, so a run stopped during it leaves an incomplete file behind.
KILL_SNAKEFILE = """\
rule all:
    input:
        "out/last.txt",

rule quick:
    output:
        "out/quick.txt",
    shell:
        "echo quick > {output}"

rule slow:
    input:
        "out/quick.txt",
    output:
        "out/slow.txt",
    shell:
        "echo start > {output}; echo run >> runs.log; sleep 15; echo end >> {output}"

rule last:
    input:
        "out/slow.txt",
    output:
        "out/last.txt",
    shell:
        "cat {input} > {output}"
"""


def run_walltime_case(folder: Path, profile: Path) -> dict:
    """Run WALLTIME_SNAKEFILE through a profile and return its folder, log and environment."""
    profile_or_skip(profile)
    folder.mkdir(parents=True)
    snakefile = folder / "Snakefile"
    snakefile.write_text(WALLTIME_SNAKEFILE)
    env = profile_env(profile, folder)
    result = run_profile(folder, profile, env=env, snakefile=snakefile)
    return {"folder": folder, "log": result.stdout + result.stderr, "env": env}


def last_submitted_job(profile: Path, log: str) -> str:
    """Return the id of the job submitted last in a snakemake log: Slurm or PBS."""
    return slurm_ids_in_log(log)[-1] if profile == SLURM_PROFILE else pbs_ids_in_log(log)[-1]


def cancel_orphan(profile: Path, job_id: str, env: dict[str, str], folder: Path) -> str:
    """Delete a job that outlived its snakemake, as its user would, and return its Slurm id."""
    if profile == SLURM_PROFILE:
        subprocess.run(["scancel", job_id], check=True, timeout=60)
        return job_id
    deleted = run_front("qdel", job_id, env=env, cwd=folder)
    assert deleted.returncode == 0, deleted.stderr
    return front_records(env)[job_id]["slurm_id"]


def wait_between_status_checks(env: dict[str, str], since: float):
    """Wait until a qstat call that began after ``since`` has returned, plus a moment.

    NOTE: snakemake-interface-executor-plugins 9.4.0 empties the executor's list of active
    jobs while a status check runs (RemoteExecutor._wait_for_jobs), so a Ctrl-C during a check
    cancels nothing and the job keeps running. PBS status checks call one qstat per job, which
    makes that window wide enough to hit, so the test interrupts right after a check instead.
    """
    wait_for(lambda: any(call["time"] > since for call in front_calls(env, "qstat")), 30,
             "a status check", interval=0.1)
    time.sleep(0.3)


def run_kill_case(folder: Path, profile: Path, kill_signal: signal.Signals) -> dict:
    """Start KILL_SNAKEFILE, send kill_signal while the slow job runs, then run it again.

    After SIGKILL the running job outlives snakemake. Snakemake 9.27 does not take such a job
    over on a rerun: --rerun-incomplete submits it again, and without that option the rerun
    stops on the incomplete output. So the case deletes the orphan and removes the stale lock,
    as a user has to, before the rerun.
    """
    profile_or_skip(profile)
    folder.mkdir(parents=True)
    snakefile = folder / "Snakefile"
    snakefile.write_text(KILL_SNAKEFILE)
    env = profile_env(profile, folder)
    quick = folder / "out/quick.txt"
    slow = folder / "out/slow.txt"

    command = snakemake_command(folder, profile, *scheduler_arguments(profile), snakefile=snakefile)
    with open(folder / "first-run.log", "w") as first_log:
        first = subprocess.Popen(command, stdout=first_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(slow.exists, 180, "the slow job to start writing")
            if profile == PBS_PROFILE and kill_signal == signal.SIGINT:
                wait_between_status_checks(env, since=time.time())
        finally:
            first.send_signal(kill_signal)
            first.wait(timeout=120)
    first_text = (folder / "first-run.log").read_text()
    outcome = {
        "folder": folder,
        "env": env,
        "first_log": first_text,
        "first_status": first.returncode,
        "slow_after_stop": slow.read_text() if slow.exists() else None,
        "incomplete_markers": len(list((folder / ".snakemake/incomplete").glob("*"))),
        "stopped_job": last_submitted_job(profile, first_text),
    }

    if kill_signal == signal.SIGKILL:
        outcome["orphan_slurm_id"] = cancel_orphan(profile, outcome["stopped_job"], env, folder)
        outcome["orphan_state"] = wait_slurm_finished(outcome["orphan_slurm_id"], timeout=60)["JobState"]
        subprocess.run(snakemake_command(folder, profile, "--unlock", snakefile=snakefile),
                       env=env, check=True, capture_output=True, timeout=120)
    quick_mtime = quick.stat().st_mtime
    rerun = run_profile(folder, profile, "--rerun-incomplete", env=env, snakefile=snakefile)
    outcome["log"] = rerun.stdout + rerun.stderr
    outcome["quick_mtime"] = (quick_mtime, quick.stat().st_mtime)
    return outcome


# Each failure case spends most of its time waiting for the scheduler (Slurm enforced the
# one-minute limit after about 85 s here), so they all run at once, in threads, and the tests
# below check one case each.
FAILURE_CASES = {
    "walltime-slurm": (run_walltime_case, SLURM_PROFILE),
    "walltime-pbs": (run_walltime_case, PBS_PROFILE),
    "sigint-slurm": (run_kill_case, SLURM_PROFILE, signal.SIGINT),
    "sigterm-slurm": (run_kill_case, SLURM_PROFILE, signal.SIGTERM),
    "sigint-pbs": (run_kill_case, PBS_PROFILE, signal.SIGINT),
    "sigkill-slurm": (run_kill_case, SLURM_PROFILE, signal.SIGKILL),
    "sigkill-pbs": (run_kill_case, PBS_PROFILE, signal.SIGKILL),
}


@pytest.fixture(scope="module")
def failure_runs(tmp_path_factory) -> dict[str, Future]:
    root = tmp_path_factory.mktemp("failures")
    with ThreadPoolExecutor(max_workers=len(FAILURE_CASES)) as pool:
        futures = {name: pool.submit(case[0], root / name, *case[1:]) for name, case in FAILURE_CASES.items()}
    return futures


@pytest.mark.parametrize("name", ["walltime-slurm", "walltime-pbs"])
def test_walltime_kill_is_retried(failure_runs, name):
    outcome = failure_runs[name].result()
    folder, log = outcome["folder"], outcome["log"]

    assert (folder / "out/slow.txt").read_text() == "done\n"
    assert (folder / "attempts.log").read_text() == "attempt 1\nattempt 2\n"
    if name == "walltime-slurm":
        first, second = slurm_ids_in_log(log)
        assert slurm_job(first)["JobState"] == "TIMEOUT"
        assert slurm_job(second)["JobState"] == "COMPLETED"
        assert "SLURM status is: 'TIMEOUT'" in log
    else:
        first, second = pbs_ids_in_log(log)
        records = front_records(outcome["env"])
        assert slurm_job(records[first]["slurm_id"])["JobState"] == "TIMEOUT"
        assert slurm_job(records[second]["slurm_id"])["JobState"] == "COMPLETED"
        assert records[first]["resources"]["walltime"] == "00:01:00"
        assert records[second]["resources"]["walltime"] == "00:05:00"
        # qstat reported PBS Pro's walltime kill, Exit_status -29 (JOB_EXEC_KILL_WALLTIME).
        finished = [json.loads(call["output"])["Jobs"][first] for call in front_calls(outcome["env"], "qstat")
                    if call["argv"][-1] == first and call["status"] == 0 and '"job_state": "F"' in call["output"]]
        assert finished
        assert finished[0]["Exit_status"] == -29
        assert f"{first} finished (job_state F) with Exit_status -29" in log


def stopped_slurm_id(outcome: dict) -> str:
    """Return the Slurm id of the job that was running when snakemake was stopped."""
    job_id = outcome["stopped_job"]
    return front_records(outcome["env"])[job_id]["slurm_id"] if job_id.endswith(SERVER) else job_id


def rerun_rules(outcome: dict) -> list[str]:
    return re.findall(r"^rule (\w+):", outcome["log"], re.MULTILINE)


@pytest.mark.parametrize("name", ["sigint-slurm", "sigint-pbs"])
def test_sigint_cancels_then_rerun_resumes(failure_runs, name):
    """Ctrl-C: snakemake cancels the running job, and the rerun runs it again."""
    outcome = failure_runs[name].result()
    folder = outcome["folder"]

    assert outcome["first_status"] != 0
    assert "Terminating processes on user request" in outcome["first_log"]
    assert slurm_job(stopped_slurm_id(outcome))["JobState"] == "CANCELLED"
    if name == "sigint-pbs":
        assert [call["argv"] for call in front_calls(outcome["env"], "qdel")] == [[outcome["stopped_job"]]]
    # A half-written output is either gone or marked incomplete for the rerun.
    assert outcome["slow_after_stop"] is None or outcome["incomplete_markers"] >= 1
    assert outcome["quick_mtime"][0] == outcome["quick_mtime"][1]
    assert rerun_rules(outcome) == ["slow", "last"]
    assert (folder / "runs.log").read_text() == "run\nrun\n"
    assert (folder / "out/slow.txt").read_text() == "start\nend\n"
    assert (folder / "out/last.txt").read_text() == "start\nend\n"


def test_sigterm_finishes_running_job_first(failure_runs):
    """SIGTERM: snakemake 9 lets the running job finish and starts nothing new."""
    outcome = failure_runs["sigterm-slurm"].result()
    folder = outcome["folder"]

    assert outcome["first_status"] != 0
    assert "Will exit after finishing currently running jobs" in outcome["first_log"]
    assert slurm_job(stopped_slurm_id(outcome))["JobState"] == "COMPLETED"
    assert outcome["slow_after_stop"] == "start\nend\n"
    assert outcome["incomplete_markers"] == 0
    assert outcome["quick_mtime"][0] == outcome["quick_mtime"][1]
    assert rerun_rules(outcome) == ["last"]
    assert (folder / "runs.log").read_text() == "run\n"
    assert (folder / "out/last.txt").read_text() == "start\nend\n"


@pytest.mark.parametrize("name", ["sigkill-slurm", "sigkill-pbs"])
def test_sigkill_orphan_then_rerun_resumes(failure_runs, name):
    """SIGKILL: the job outlives snakemake, and once it is deleted the rerun redoes only it."""
    outcome = failure_runs[name].result()
    folder = outcome["folder"]

    assert outcome["first_status"] == -signal.SIGKILL
    assert outcome["slow_after_stop"] == "start\n"
    assert outcome["incomplete_markers"] >= 1
    # The job was still running after snakemake died, until the case deleted it.
    assert outcome["orphan_state"] == "CANCELLED"
    assert outcome["quick_mtime"][0] == outcome["quick_mtime"][1]
    assert rerun_rules(outcome) == ["slow", "last"]
    assert "Resuming incomplete job" not in outcome["log"]
    assert (folder / "runs.log").read_text() == "run\nrun\n"
    assert (folder / "out/slow.txt").read_text() == "start\nend\n"
    assert (folder / "out/last.txt").read_text() == "start\nend\n"
