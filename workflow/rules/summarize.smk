# Tables over every checkpoint, and the figures drawn from them.


rule table_sizes:
    input:
        expand_runs("results/sizes/{model}/{method}/{sparsity}.json"),
    output:
        "results/tables/sizes.csv",
    log:
        "logs/table_sizes/sizes.log",
    localrule: True
    script:
        "../scripts/table_sizes.py"


rule plot_sizes:
    input:
        "results/tables/sizes.csv",
    output:
        report(
            "results/figures/size_vs_sparsity.png",
            caption="../report/size_vs_sparsity.rst",
            category="Checkpoint size",
        ),
    log:
        "logs/plot_sizes/size_vs_sparsity.log",
    localrule: True
    script:
        "../scripts/plot_sizes.py"
