"""Read one task's training and evaluation data once, so that compute jobs find it cached."""

from lmprune import data
from lmprune.io import write_json_atomic
from lmprune.jobs import start_job

log = start_job(snakemake.log[0], offline=False)
task = snakemake.wildcards.task
settings = snakemake.params.settings
source = snakemake.params.local_dir or f"the hub ({snakemake.params.data_settings['hub']})"
log.info("reading %s data from %s", task, source)

try:
    if task == "clm":
        train, evaluation = data.load_clm_corpora(snakemake.params.data_settings, snakemake.params.local_dir)
    else:
        train, evaluation = data.load_qnli_corpora(
            snakemake.params.data_settings, snakemake.params.local_dir,
            settings["train_samples"], settings["eval_samples"], snakemake.params.seed,
        )
except ConnectionError as error:
    raise data.DataError(
        f"reading {task} data from {source} failed: {error}. Run on a host with hub access, or set "
        "LMPRUNE_DATA_DIR (or data.local_dir) to a folder with wikitext-2/valid.txt, "
        "wikitext-2/test.txt and qnli/dev.tsv."
    ) from error
log.info("%s data: %s training and %s evaluation rows", task, train.provenance.get("rows"), evaluation.provenance.get("rows"))

write_json_atomic(snakemake.output[0], {"task": task, "train": train.provenance, "eval": evaluation.provenance})
