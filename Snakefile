# lmprune: prune pretrained transformer language models at a ladder of sparsity levels, save
# every pruned checkpoint and measure what each level does to it.
#
#   snakemake --cores 2                           the whole run on config/config.yaml
#   snakemake --cores 2 --configfile config/paper.yaml
#   snakemake --cores 2 results/figures/size_vs_sparsity.png     one figure and what it needs

from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# Found beside this Snakefile, so --directory elsewhere still starts from the default config;
# --configfile FILE overrides its keys.
configfile: Path(workflow.basedir) / "config" / "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/fidelity.smk"
include: "workflow/rules/latency.smk"
include: "workflow/rules/summarize.smk"


rule all:
    input:
        all_targets(),
    default_target: True
