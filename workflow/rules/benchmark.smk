# Fine-tuning benchmarks: every checkpoint is fine-tuned and evaluated on each task in the config.


rule finetune_eval:
    input:
        checkpoint=checkpoint_input,
        data="results/data/{task}.json",
    output:
        "results/bench/{task}/{model}/{method}/{sparsity}.json",
    params:
        family=lambda wildcards: model_entry(wildcards)["family"],
        trust_remote_code=lambda wildcards: model_entry(wildcards)["trust_remote_code"],
        settings=lambda wildcards: config["finetune"][wildcards.task],
        data_settings=lambda wildcards: config["data"][wildcards.task],
        local_dir=DATA_DIR,
        seed=config["finetune"]["seed"],
        keep_masks=config["finetune"]["keep_masks"],
        device=config["finetune"]["device"],
        # The GPUs the job was given: on CUDA it starts one DDP process per GPU.
        gpus=lambda wildcards, resources: resources.gpu,
    log:
        "logs/finetune_eval/{task}/{model}/{method}/{sparsity}.log",
    benchmark:
        "logs/finetune_eval/{task}/{model}/{method}/{sparsity}.benchmark.tsv"
    threads: 2
    resources:
        # Defaults for a cluster profile to override per site. A local run limits jobs by gpu
        # only when given --resources gpu=N. On CUDA, gpu is also the number of DDP processes
        # the job starts (capped by the visible GPUs).
        gpu=1,
        mem_mb=16000,
        runtime=240,
    script:
        "../scripts/finetune_eval.py"


rule table_bench:
    input:
        [path for task in TASKS for path in expand_runs("results/bench/{task}/{model}/{method}/{sparsity}.json", task=task)],
    output:
        "results/tables/bench.csv",
    log:
        "logs/table_bench/bench.log",
    localrule: True
    script:
        "../scripts/table_bench.py"


rule plot_bench:
    input:
        "results/tables/bench.csv",
    output:
        report(
            "results/figures/{figure}.png",
            caption="../report/bench_figure.rst",
            category="Benchmarks",
        ),
    params:
        metric=lambda wildcards: BENCH_FIGURES[wildcards.figure],
    log:
        "logs/plot_bench/{figure}.log",
    localrule: True
    script:
        "../scripts/plot_bench.py"


# Runs on the submitting host (localrule) like resolve_model: reading a hub dataset here fills
# the Hugging Face cache, so the fine-tuning jobs on compute nodes read it with the hub offline.
rule fetch_data:
    output:
        "results/data/{task}.json",
    params:
        data_settings=lambda wildcards: config["data"][wildcards.task],
        settings=lambda wildcards: config["finetune"][wildcards.task],
        local_dir=DATA_DIR,
        seed=config["finetune"]["seed"],
    log:
        "logs/fetch_data/{task}.log",
    localrule: True
    script:
        "../scripts/fetch_data.py"
