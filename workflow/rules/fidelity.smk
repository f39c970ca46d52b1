# Zero-shot fidelity of each pruned checkpoint to the dense source model on held-out text.


rule measure_fidelity:
    input:
        checkpoint=checkpoint_input,
        source="results/models/{model}.json",
        # Not read by the job: it makes fetch_data fill the hub cache on the submitting host first.
        data="results/data/clm.json",
    output:
        "results/fidelity/{model}/{method}/{sparsity}.json",
    params:
        settings=config["fidelity"],
        data_settings=config["data"]["clm"],
        local_dir=DATA_DIR,
        trust_remote_code=lambda wildcards: model_entry(wildcards)["trust_remote_code"],
    log:
        "logs/measure_fidelity/{model}/{method}/{sparsity}.log",
    benchmark:
        "logs/measure_fidelity/{model}/{method}/{sparsity}.benchmark.tsv"
    threads: 2
    resources:
        # Inference only, so one GPU at most; none when fidelity.device is cpu. With device auto
        # the job runs on the CPU where the scheduler gives it no GPU.
        gpu=0 if config["fidelity"]["device"] == "cpu" else 1,
    script:
        "../scripts/measure_fidelity.py"


rule table_fidelity:
    input:
        expand_runs("results/fidelity/{model}/{method}/{sparsity}.json"),
    output:
        "results/tables/fidelity.csv",
    log:
        "logs/table_fidelity/fidelity.log",
    localrule: True
    script:
        "../scripts/table_fidelity.py"


# The figure names in FIDELITY_FIGURES all start with "fidelity_". The wildcard takes the rest, so
# these paths never match plot_bench's {figure} (constrained to the benchmark figure names).
rule plot_fidelity:
    input:
        "results/tables/fidelity.csv",
    output:
        report(
            "results/figures/fidelity_{fidelity_figure}.png",
            caption="../report/fidelity_figure.rst",
            category="Zero-shot fidelity",
            labels={"figure": "{fidelity_figure}"},
        ),
    params:
        metric=lambda wildcards: FIDELITY_FIGURES[f"fidelity_{wildcards.fidelity_figure}"],
    wildcard_constraints:
        fidelity_figure="|".join(re.escape(name.removeprefix("fidelity_")) for name in FIDELITY_FIGURES),
    log:
        "logs/plot_fidelity/fidelity_{fidelity_figure}.log",
    localrule: True
    script:
        "../scripts/plot_fidelity.py"
