"""Resolve one model source to a local folder and record where it came from."""

from lmprune.io import write_json_atomic
from lmprune.jobs import start_job
from lmprune.models import resolve_model

log = start_job(snakemake.log[0], offline=False)

source = snakemake.params.source
log.info("resolving model %s from %s", snakemake.wildcards.model, source)
resolved = resolve_model(source, cache_dir=snakemake.params.cache_dir)
log.info("model %s is in %s", snakemake.wildcards.model, resolved.folder)

write_json_atomic(snakemake.output[0], {"model": snakemake.wildcards.model, "source": source, **resolved.to_dict()})
