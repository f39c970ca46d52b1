"""The cluster profiles without a scheduler: PBS Pro qsub lines, qstat states, GPU pinning, dry runs.

qsub, qstat and qdel are small scripts in a temporary folder put first on PATH. They record their
arguments and print canned output. tests/test_cluster.py runs the profiles on a real scheduler.
"""

from __future__ import annotations

import getopt
import json
import multiprocessing
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from lmprune import cluster, gpus

PBS_PROFILE = REPO / "profiles" / "pbs"
SLURM_PROFILE = REPO / "profiles" / "slurm"

POLARIS = cluster.Site(account="myproj", queue="debug", filesystems="home:eagle", system="polaris")
TIMESTAMP = "20261204T120000"

FINETUNE_JOB = {
    "type": "single",
    "rule": "finetune_eval",
    "wildcards": {"task": "clm", "model": "gpt2-medium", "method": "magnitude", "sparsity": "s50"},
    "threads": 8,
    "resources": {"tmpdir": "<TBD>", "mem_mb": 32000, "mem_mib": 30518, "runtime": 240, "gpu": 1},
    "jobid": 12,
}
PRUNE_JOB = {
    "type": "single",
    "rule": "prune",
    "wildcards": {"model": "gpt2-medium", "method": "magnitude", "sparsity": "s50"},
    "threads": 8,
    "resources": {"tmpdir": "<TBD>", "mem_mb": 16000, "mem_mib": 15259, "runtime": 30, "gpu": 0},
    "jobid": 3,
}
# Four packed fine-tunes, with the sums Snakemake writes into a group job's properties.
GROUP_JOB = {
    "type": "group",
    "groupid": "gpu-node",
    "threads": 32,
    "resources": {"gpu": 4, "mem_mb": 128000, "mem_mib": 122071, "runtime": 240, "disk_mb": 200000},
    "jobid": "c9d1be77-dc01-5e9b-8b33-3707c1b12170",
}

# The options of qsub(1B) (OpenPBS doc/man1/qsub.1B) for getopt: a letter before ":" takes a value.
QSUB_OPTIONS = "a:A:c:C:e:fhIj:J:k:l:m:M:N:o:p:q:r:R:S:u:v:VW:XzP:"
# One select chunk: N:resource=value[:resource=value...], no "+" (a single chunk type).
SELECT = re.compile(r"^select=\d+(:[a-z_]+=[A-Za-z0-9_.-]+)+$")
WALLTIME = re.compile(r"^walltime=\d{2,}:[0-5]\d:[0-5]\d$")
FILESYSTEMS = re.compile(r"^filesystems=[a-z0-9_]+(:[a-z0-9_]+)*$")


def check_pbs_syntax(command: list[str]) -> dict[str, list[str]]:
    """Parse a qsub argument list as PBS Pro's qsub does and check every value's syntax.

    Returns {option: [values]} with the script under "script".
    """
    assert command[0] == "qsub"
    options, operands = getopt.getopt(command[1:], QSUB_OPTIONS)
    assert len(operands) == 1, f"qsub takes one script, got {operands}"
    parsed: dict[str, list[str]] = {"script": operands}
    for flag, value in options:
        parsed.setdefault(flag, []).append(value)

    for value in parsed.get("-l", []):
        assert "," not in value, f"one resource per -l keeps values unambiguous: {value}"
        name = value.split("=", 1)[0]
        pattern = {"select": SELECT, "walltime": WALLTIME, "filesystems": FILESYSTEMS}[name]
        assert pattern.match(value), f"invalid PBS -l {name}: {value}"
    (name,) = parsed["-N"]
    assert 0 < len(name) <= 236
    assert name[0].isalnum()
    assert not re.search(r"\s", name)
    for flag in ("-o", "-e"):
        (path,) = parsed[flag]
        assert ":" not in path, f"PBS reads host:path from a colon: {path}"
    return parsed


# --- qsub command lines ---------------------------------------------------------------------


def test_qsub_polaris_finetune_job():
    command = cluster.qsub_command(FINETUNE_JOB, POLARIS, "/work/job.sh.pbs", TIMESTAMP)

    name = "finetune_eval.clm.gpt2-medium.magnitude.s50"
    assert command == [
        "qsub",
        "-A", "myproj",
        "-q", "debug",
        "-l", "select=1:ncpus=8:ngpus=1:system=polaris",
        "-l", "walltime=04:00:00",
        "-l", "filesystems=home:eagle",
        "-N", name,
        "-o", f"logs/pbs/{name}.{TIMESTAMP}.out",
        "-e", f"logs/pbs/{name}.{TIMESTAMP}.err",
        "/work/job.sh.pbs",
    ]
    check_pbs_syntax(command)


def test_qsub_polaris_cpu_job():
    command = cluster.qsub_command(PRUNE_JOB, POLARIS, "/work/job.sh.pbs", TIMESTAMP)
    parsed = check_pbs_syntax(command)

    assert parsed["-l"] == ["select=1:ncpus=8:system=polaris", "walltime=00:30:00", "filesystems=home:eagle"]
    assert parsed["-N"] == ["prune.gpt2-medium.magnitude.s50"]
    assert parsed["-A"] == ["myproj"]
    assert parsed["-q"] == ["debug"]
    assert "ngpus" not in " ".join(command)


def test_qsub_group_job_sums():
    parsed = check_pbs_syntax(cluster.qsub_command(GROUP_JOB, POLARIS, "/work/job.sh.pbs", TIMESTAMP))

    assert parsed["-l"][0] == "select=1:ncpus=32:ngpus=4:system=polaris"
    assert parsed["-l"][1] == "walltime=04:00:00"
    assert parsed["-N"] == ["gpu-node.c9d1be77"]


def test_qsub_memory_and_extras():
    site = cluster.Site(memory=True, select_extra="mpiprocs=1", qsub_args=["-l", "place=scatter"])
    command = cluster.qsub_command(FINETUNE_JOB, site, "job.pbs", TIMESTAMP)

    assert command[1:3] == ["-l", "select=1:ncpus=8:ngpus=1:mem=30518mb:mpiprocs=1"]
    assert command[-3:] == ["-l", "place=scatter", "job.pbs"]
    assert "-A" not in command
    assert "-q" not in command
    assert not any(value.startswith("filesystems=") for value in command)


def test_qsub_memory_from_mem_mb():
    job = {**PRUNE_JOB, "resources": {"mem_mb": 1000, "runtime": 5}}
    assert cluster.select_statement(job, cluster.Site(memory=True)) == "1:ncpus=8:mem=954mb"


def test_qsub_rejects_missing_runtime():
    job = {**PRUNE_JOB, "resources": {"mem_mb": 1000}}
    with pytest.raises(ValueError, match="runtime"):
        cluster.qsub_command(job, POLARIS, "job.pbs", TIMESTAMP)


@pytest.mark.parametrize(
    "minutes, expected",
    [(240, "04:00:00"), (1, "00:01:00"), (90.5, "01:30:30"), (0.01, "00:00:01"), (3000, "50:00:00"), ("45", "00:45:00")],
)
def test_walltime_format(minutes, expected):
    assert cluster.walltime(minutes) == expected


@pytest.mark.parametrize("minutes", [0, -5, "2h", None, float("nan")])
def test_walltime_rejects_invalid(minutes):
    with pytest.raises(ValueError, match="runtime"):
        cluster.walltime(minutes)


def test_job_name_sanitised():
    job = {"type": "single", "rule": "prune", "wildcards": {"model": "my model/v2"}}
    assert cluster.job_name(job) == "prune.my_model_v2"
    assert cluster.job_name({"type": "group", "groupid": "_g", "jobid": "abc"}) == "j_g.abc"


def test_parse_qsub_output():
    assert cluster.parse_qsub_output("1234.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov\n") == (
        "1234.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"
    )
    assert cluster.parse_qsub_output("\n77\n") == "77"
    with pytest.raises(ValueError, match="no job id"):
        cluster.parse_qsub_output("qsub: would exceed queue limit\n")


# --- site.yaml --------------------------------------------------------------------------------


def test_shipped_site_loads():
    site = cluster.load_site(PBS_PROFILE / "site.yaml")

    assert site.filesystems == "home:eagle"
    assert site.system == "polaris"
    assert ". .venv/bin/activate" in site.setup


def test_site_unknown_key(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("acount: myproj\n")
    with pytest.raises(cluster.SiteError, match="unknown key.*acount"):
        cluster.load_site(path)


def test_site_wrong_type(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("qsub_args: -l place=scatter\n")
    with pytest.raises(cluster.SiteError, match="qsub_args must be a list"):
        cluster.load_site(path)


def test_site_numeric_account(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("account: 123456\n")
    assert cluster.load_site(path).account == "123456"


def test_site_missing_file(tmp_path):
    with pytest.raises(cluster.SiteError, match="not found"):
        cluster.load_site(tmp_path / "nowhere.yaml")


# --- pbs-submit.py, the PBS job script and pbs-cancel.py -----------------------------------------


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_pbs(tmp_path) -> dict:
    """A folder with qsub, qstat and qdel stand-ins that record their arguments, and an environment."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    calls = tmp_path / "calls"
    for command in ("qsub", "qdel"):
        write_executable(
            bin_folder / command,
            f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}.{command}\n'
            + ('echo 1234.polaris-pbs-01\n' if command == "qsub" else ""),
        )
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({
        "account": "myproj", "queue": "debug", "filesystems": "home:eagle", "system": "polaris",
        "setup": "export LMPRUNE_TEST_SETUP=ran\n",
    }))
    environment = {**os.environ, "PATH": f"{bin_folder}:{os.environ['PATH']}", "LMPRUNE_PBS_SITE": str(site)}
    return {"bin": bin_folder, "calls": calls, "env": environment, "workdir": tmp_path}


def snakemake_jobscript(folder: Path, properties: dict, command: str) -> Path:
    """Write a job script in the form Snakemake's cluster-generic executor writes."""
    path = folder / "snakejob.finetune_eval.12.sh"
    path.write_text(f"#!/bin/sh\n# properties = {json.dumps(properties)}\n{command}\n")
    return path


def test_submit_prints_job_id(fake_pbs):
    jobscript = snakemake_jobscript(fake_pbs["workdir"], FINETUNE_JOB, "true && exit 0 || exit 1")
    result = subprocess.run(
        [str(PBS_PROFILE / "pbs-submit.py"), str(jobscript)],
        cwd=fake_pbs["workdir"], env=fake_pbs["env"], capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "1234.polaris-pbs-01\n"
    arguments = fake_pbs["calls"].with_suffix(".qsub").read_text().splitlines()
    parsed = check_pbs_syntax(["qsub", *arguments])
    assert parsed["-l"][0] == "select=1:ncpus=8:ngpus=1:system=polaris"
    assert parsed["script"] == [f"{jobscript}.pbs"]
    assert (fake_pbs["workdir"] / "logs/pbs").is_dir()
    assert "1234.polaris-pbs-01\tqsub -A myproj" in (fake_pbs["workdir"] / "logs/pbs/qsub.log").read_text()


def test_submit_dry_run_prints_command(fake_pbs):
    jobscript = snakemake_jobscript(fake_pbs["workdir"], PRUNE_JOB, "true")
    result = subprocess.run(
        [str(PBS_PROFILE / "pbs-submit.py"), "--dry-run", str(jobscript)],
        cwd=fake_pbs["workdir"], env=fake_pbs["env"], capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("qsub -A myproj -q debug -l select=1:ncpus=8:system=polaris ")
    assert not fake_pbs["calls"].with_suffix(".qsub").exists()


def test_submit_reports_qsub_failure(fake_pbs):
    write_executable(fake_pbs["bin"] / "qsub", '#!/bin/sh\necho "qsub: Unknown queue" >&2\nexit 159\n')
    jobscript = snakemake_jobscript(fake_pbs["workdir"], PRUNE_JOB, "true")
    # The script runs with time.sleep disabled, because three attempts 10 s apart would slow
    # the suite.
    result = subprocess.run(
        [sys.executable, "-c",
         "import runpy, sys, time; time.sleep = lambda seconds: None; "
         f"sys.argv = ['pbs-submit.py', {str(jobscript)!r}]; "
         f"runpy.run_path({str(PBS_PROFILE / 'pbs-submit.py')!r}, run_name='__main__')"],
        cwd=fake_pbs["workdir"], env=fake_pbs["env"], capture_output=True, text=True, timeout=60,
    )

    assert result.returncode != 0
    assert result.stdout == ""
    assert "Unknown queue" in result.stderr
    assert "failed 3 times" in result.stderr


def test_job_script_runs_setup_and_records_exit(tmp_path):
    body = 'echo "setup=$LMPRUNE_TEST_SETUP pwd=$(pwd)" > out.txt\nfalse && exit 0 || exit 1'
    site = cluster.Site(setup="export LMPRUNE_TEST_SETUP=ran\n")
    script = tmp_path / "job.pbs"
    script.write_text(cluster.pbs_job_script(f"#!/bin/sh\n# properties = {{}}\n{body}\n", site, str(tmp_path)))

    # PBS starts jobs in the home folder; the script must change to the working folder itself.
    result = subprocess.run(
        ["sh", str(script)], cwd="/", env={**os.environ, "PBS_JOBID": "77.pbs-test"}, capture_output=True, text=True
    )

    assert result.returncode == 1
    assert (tmp_path / "out.txt").read_text() == f"setup=ran pwd={tmp_path}\n"
    assert (tmp_path / "logs/pbs/exit/77.pbs-test").read_text() == "1\n"
    assert "#PBS" not in script.read_text()


def test_cancel_runs_qdel(fake_pbs):
    result = subprocess.run(
        [str(PBS_PROFILE / "pbs-cancel.py"), "1.pbs", "2.pbs"], env=fake_pbs["env"], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    assert fake_pbs["calls"].with_suffix(".qdel").read_text().splitlines() == ["1.pbs", "2.pbs"]


# --- job states from qstat ----------------------------------------------------------------------


def qstat_json(job_id: str, **attributes) -> str:
    """Return qstat -x -f -F json output in PBS Pro's layout for one job."""
    job = {"Job_Name": "prune", "Job_Owner": "me@polaris-login-01", "queue": "debug", **attributes}
    return json.dumps({"timestamp": 1765000000, "pbs_version": "2022.1.3", "pbs_server": "polaris-pbs-01",
                       "Jobs": {job_id: job}}, indent=4)


JOB = "1234.polaris-pbs-01"


@pytest.mark.parametrize(
    "attributes, expected",
    [
        ({"job_state": "Q", "comment": "Not Running: Queue limits"}, "running"),
        ({"job_state": "H", "comment": "job held, filesystem eagle down"}, "running"),
        ({"job_state": "R"}, "running"),
        ({"job_state": "E"}, "running"),
        ({"job_state": "F", "Exit_status": 0}, "success"),
        ({"job_state": "F", "Exit_status": 1}, "failed"),
        ({"job_state": "F", "Exit_status": 271}, "failed"),  # killed by SIGTERM (256 + 15)
        ({"job_state": "F", "Exit_status": -29}, "failed"),  # killed for exceeding walltime
        ({"job_state": "F"}, "failed"),  # deleted before it ran: no Exit_status
    ],
)
def test_status_from_qstat(attributes, expected):
    seen = cluster.job_status(JOB, 0, qstat_json(JOB, **attributes), "")
    assert seen.status == expected


def test_status_held_needs_attention():
    seen = cluster.job_status(JOB, 0, qstat_json(JOB, job_state="H", comment="filesystem eagle down"), "")
    assert seen.needs_attention
    assert "filesystem eagle down" in seen.message


def test_status_failed_names_error_file():
    output = qstat_json(JOB, job_state="F", Exit_status=1, Error_Path="polaris-login-01:/eagle/p/logs/pbs/prune.err")
    assert "stderr in /eagle/p/logs/pbs/prune.err" in cluster.job_status(JOB, 0, output, "").message


def test_status_running_quiet():
    assert not cluster.job_status(JOB, 0, qstat_json(JOB, job_state="R"), "").needs_attention


def test_status_job_key_without_server():
    # qsub printed the full id, qstat lists the job under a longer server name.
    output = qstat_json("1234.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov", job_state="F", Exit_status=0)
    assert cluster.job_status(JOB, 0, output, "").status == "success"


def test_status_unknown_job():
    seen = cluster.job_status(JOB, 153, "", f"qstat: Unknown Job Id {JOB}\n")
    assert seen.status == cluster.UNKNOWN


def test_status_job_missing_from_output():
    output = json.dumps({"timestamp": 1, "pbs_version": "2022.1.3", "pbs_server": "x", "Jobs": {}})
    assert cluster.job_status(JOB, 0, output, "").status == cluster.UNKNOWN


def test_status_qstat_error_is_running():
    seen = cluster.job_status(JOB, 1, "", "qstat: cannot connect to server polaris-pbs-01 (errno=15010)\n")
    assert seen.status == "running"
    assert seen.needs_attention


def test_status_unreadable_output_is_running():
    assert cluster.job_status(JOB, 0, "<html>proxy error</html>", "").status == "running"


def test_status_invalid_json_read_by_pattern():
    # qstat has written the quotes of environment variable values unescaped, which breaks the JSON.
    output = qstat_json(JOB, job_state="F", Exit_status=-29, Variable_List="A=x").replace('"A=x"', '"A="x""')
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)
    assert cluster.job_status(JOB, 0, output, "").status == "failed"


def test_exit_record_decides_unknown_job(tmp_path):
    assert cluster.status_from_exit_record(JOB, tmp_path).status == "failed"

    (tmp_path / "1234.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov").write_text("0\n")
    assert cluster.status_from_exit_record(JOB, tmp_path).status == "success"

    (tmp_path / JOB).write_text("1\n")
    assert cluster.status_from_exit_record(JOB, tmp_path).status == "failed"


def run_status(fake_pbs, qstat_script: str | None) -> subprocess.CompletedProcess:
    qstat = fake_pbs["bin"] / "qstat"
    if qstat_script is None:
        qstat.unlink(missing_ok=True)
        environment = {**fake_pbs["env"], "PATH": f"{fake_pbs['bin']}:/nonexistent"}
    else:
        write_executable(qstat, qstat_script)
        environment = fake_pbs["env"]
    return subprocess.run(
        [sys.executable, str(PBS_PROFILE / "pbs-status.py"), JOB],
        cwd=fake_pbs["workdir"], env=environment, capture_output=True, text=True, timeout=60,
    )


def test_status_script_finished(fake_pbs):
    output = qstat_json(JOB, job_state="F", Exit_status=0)
    result = run_status(fake_pbs, f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")

    assert result.returncode == 0
    assert result.stdout == "success\n"
    assert "Exit_status 0" in result.stderr


def test_status_script_walltime_kill(fake_pbs):
    output = qstat_json(JOB, job_state="F", Exit_status=-29)
    result = run_status(fake_pbs, f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")

    assert result.returncode == 0
    assert result.stdout == "failed\n"


def test_status_script_qstat_failing(fake_pbs):
    result = run_status(fake_pbs, "#!/bin/sh\necho 'qstat: cannot connect to server' >&2\nexit 1\n")

    assert result.returncode == 0
    assert result.stdout == "running\n"
    assert "cannot connect" in result.stderr


def test_status_script_qstat_missing(fake_pbs):
    result = run_status(fake_pbs, None)

    assert result.returncode == 0
    assert result.stdout == "running\n"


def test_status_script_unknown_job_with_exit_record(fake_pbs):
    records = fake_pbs["workdir"] / "logs/pbs/exit"
    records.mkdir(parents=True)
    (records / JOB).write_text("0\n")
    result = run_status(fake_pbs, f"#!/bin/sh\necho 'qstat: Unknown Job Id {JOB}' >&2\nexit 153\n")

    assert result.returncode == 0
    assert result.stdout == "success\n"


def test_status_script_unknown_job_without_record(fake_pbs):
    result = run_status(fake_pbs, f"#!/bin/sh\necho 'qstat: Unknown Job Id {JOB}' >&2\nexit 153\n")

    assert result.returncode == 0
    assert result.stdout == "failed\n"


# --- GPU pinning --------------------------------------------------------------------------------


def claim_in_child(environment: dict, queue, release, timeout) -> None:
    """Claim one GPU in a fresh process, report CUDA_VISIBLE_DEVICES and hold it until released."""
    os.environ.clear()
    os.environ.update(environment)
    try:
        gpus.claim_gpu(1, timeout=timeout, poll_seconds=0.05)
    except TimeoutError:
        queue.put("timeout")
        return
    queue.put(os.environ.get("CUDA_VISIBLE_DEVICES"))
    release.wait(30)


@pytest.fixture
def gpu_job_environment(tmp_path) -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")}
    environment.update({"PBS_JOBID": "55.pbs-test", "LMPRUNE_NODE_GPUS": "4", "LMPRUNE_GPU_LOCK_DIR": str(tmp_path)})
    return environment


def test_claim_gpu_distinct_across_processes(gpu_job_environment):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    release = context.Event()
    workers = [context.Process(target=claim_in_child, args=(gpu_job_environment, queue, release, 20)) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        claimed = sorted(queue.get(timeout=30) for _ in workers)
        # A fifth process finds every GPU taken.
        extra = context.Process(target=claim_in_child, args=(gpu_job_environment, queue, release, 0.3))
        extra.start()
        fifth = queue.get(timeout=30)
        extra.join(30)
    finally:
        release.set()
        for worker in workers:
            worker.join(30)

    assert claimed == ["0", "1", "2", "3"]
    assert fifth == "timeout"


def test_claim_gpu_after_release(gpu_job_environment, monkeypatch):
    """A GPU whose process exited is free again."""
    for name, value in gpu_job_environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    release = context.Event()
    release.set()
    first = context.Process(target=claim_in_child, args=(gpu_job_environment, queue, release, 5))
    first.start()
    assert queue.get(timeout=30) == "0"
    first.join(30)

    monkeypatch.setattr(gpus, "_held_locks", [])
    assert gpus.claim_gpu(1, timeout=5) == ["0"]
    for descriptor in gpus._held_locks:
        os.close(descriptor)


def test_claim_gpu_uses_visible_devices(gpu_job_environment, monkeypatch):
    for name, value in gpu_job_environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LMPRUNE_NODE_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(gpus, "_held_locks", [])

    assert gpus.claim_gpu(2, timeout=5) == ["4", "5"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
    for descriptor in gpus._held_locks:
        os.close(descriptor)


@pytest.mark.parametrize(
    "change",
    [
        {"PBS_JOBID": None},  # not in a scheduler job
        {"LMPRUNE_NODE_GPUS": "1"},  # one GPU: nothing to share
        {"LMPRUNE_NODE_GPUS": "0"},
    ],
)
def test_claim_gpu_does_nothing(gpu_job_environment, monkeypatch, change):
    for name, value in {**gpu_job_environment, **change}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    assert gpus.claim_gpu(1) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_claim_gpu_all_gpus_does_nothing(gpu_job_environment, monkeypatch):
    for name, value in gpu_job_environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    # A DDP job given every GPU of the node keeps them all.
    assert gpus.claim_gpu(4) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_node_gpus_sources(monkeypatch):
    monkeypatch.delenv("LMPRUNE_NODE_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa, GPU-bbb")
    assert gpus.node_gpus() == ["GPU-aaa", "GPU-bbb"]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpus.node_gpus() == []

    monkeypatch.setenv("LMPRUNE_NODE_GPUS", "four")
    with pytest.raises(ValueError, match="LMPRUNE_NODE_GPUS"):
        gpus.node_gpus()


# --- the profiles in Snakemake dry runs ---------------------------------------------------------


def dry_run(profile: Path, tmp_path: Path, *arguments: str) -> str:
    """Run `snakemake -n --profile PROFILE` from the repository root on config/paper.yaml.

    --directory keeps the repository's .snakemake and results out of it, so every job is listed.
    A dry run resolves no model and downloads nothing.
    """
    command = [
        sys.executable, "-m", "snakemake", "-n", "--profile", str(profile.relative_to(REPO)),
        "--directory", str(tmp_path), *arguments, "--configfile", "config/paper.yaml",
    ]
    environment = {key: value for key, value in os.environ.items() if key != "LMPRUNE_DATA_DIR"}
    environment.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def rule_blocks(output: str, rule: str) -> list[str]:
    """Return the text of every job of ``rule`` in a dry run's job list."""
    return re.findall(rf"^\s*rule {rule}:\n(.*?)(?=^\s*\S*\[|\Z)", output, re.MULTILINE | re.DOTALL)


def test_pbs_profile_dry_run_paper(tmp_path):
    output = dry_run(PBS_PROFILE, tmp_path)

    prune = rule_blocks(output, "prune")
    checkpoints = {re.search(r"output: (\S+)", block).group(1) for block in prune}
    assert len(checkpoints) == 36
    assert {path.split("/")[2] for path in checkpoints} == {"gpt2-medium", "bart-large", "bert-large"}
    assert {path.split("/")[4] for path in checkpoints} == {
        "s0", "s5", "s10", "s20", "s30", "s40", "s50", "s60", "s70", "s80", "s90", "s95",
    }
    assert all(re.search(r"resources: .*\bgpu=0\b", block) for block in prune)

    finetune = rule_blocks(output, "finetune_eval")
    assert len(finetune) == 72
    assert all(re.search(r"resources: .*\bgpu=1\b", block) for block in finetune)
    assert all(re.search(r"resources: .*\bruntime=240\b", block) for block in finetune)
    assert {re.search(r"task=(\w+)", block).group(1) for block in finetune} == {"clm", "qnli"}

    for rule in ("measure_size", "plot_histograms"):
        blocks = rule_blocks(output, rule)
        assert len(blocks) == 36
        assert all(re.search(r"resources: .*\bgpu=0\b", block) for block in blocks)


def test_pbs_profile_dry_run_packed(tmp_path):
    output = dry_run(PBS_PROFILE, tmp_path, "--groups", "finetune_eval=gpu-node", "--group-components", "gpu-node=4")

    assert output.count("Group job gpu-node") == 72 // 4


def test_slurm_profile_dry_run_paper(tmp_path):
    output = dry_run(SLURM_PROFILE, tmp_path)

    finetune = rule_blocks(output, "finetune_eval")
    assert len(finetune) == 72
    assert all(re.search(r"resources: .*\bgpu=1\b", block) for block in finetune)
    assert len(rule_blocks(output, "prune")) == 36


def test_profile_scripts_executable():
    config = yaml.safe_load((PBS_PROFILE / "config.yaml").read_text())

    for key in ("cluster-generic-submit-cmd", "cluster-generic-status-cmd", "cluster-generic-cancel-cmd"):
        script = PBS_PROFILE / config[key]
        assert script.is_file(), key
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_slurm_profile_uses_squeue():
    config = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())

    assert config["executor"] == "slurm"
    assert config["slurm-status-command"] == "squeue"
    assert config["set-resources"]["finetune_eval"]["gpu"] == 1

