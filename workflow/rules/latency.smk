# Inference latency and throughput of each checkpoint against the dense source model.


rule measure_latency:
    input:
        checkpoint=checkpoint_input,
        source="results/models/{model}.json",
    output:
        "results/latency/{model}/{method}/{sparsity}.json",
    params:
        batch_size=config["latency"]["batch_size"],
        seq_length=config["latency"]["seq_length"],
        warmup=config["latency"]["warmup"],
        repeats=config["latency"]["repeats"],
        device=config["latency"]["device"],
        dtype=config["latency"]["dtype"],
        trust_remote_code=lambda wildcards: model_entry(wildcards)["trust_remote_code"],
    log:
        "logs/measure_latency/{model}/{method}/{sparsity}.log",
    benchmark:
        "logs/measure_latency/{model}/{method}/{sparsity}.benchmark.tsv"
    # All the cores of a local run, so no other job runs beside the timing; cluster profiles
    # set their own count.
    threads: all_local_cores
    resources:
        # Defaults for a cluster profile to override per site. A local run limits jobs by gpu
        # only when given --resources gpu=N. The job times both models on one device, so it
        # uses one GPU whatever the count.
        gpu=1,
        mem_mb=16000,
        runtime=60,
    script:
        "../scripts/measure_latency.py"


rule table_latency:
    input:
        expand_runs("results/latency/{model}/{method}/{sparsity}.json"),
    output:
        "results/tables/latency.csv",
    log:
        "logs/table_latency/latency.log",
    localrule: True
    script:
        "../scripts/table_latency.py"


# Output names start with latency_, and the wildcard takes only the rest of a LATENCY_FIGURES
# name, so these files never match plot_bench's results/figures/{figure}.png.
rule plot_latency:
    input:
        "results/tables/latency.csv",
    output:
        report(
            "results/figures/latency_{latency_figure}.png",
            caption="../report/latency_figure.rst",
            category="Latency",
        ),
    params:
        metric=lambda wildcards: LATENCY_FIGURES[f"latency_{wildcards.latency_figure}"],
    log:
        "logs/plot_latency/latency_{latency_figure}.log",
    wildcard_constraints:
        latency_figure="|".join(re.escape(name.removeprefix("latency_")) for name in LATENCY_FIGURES),
    localrule: True
    script:
        "../scripts/plot_latency.py"
