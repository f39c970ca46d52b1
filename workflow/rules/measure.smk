# Measurements of each pruned checkpoint: sizes on disk and compressed, weight histograms.


rule measure_size:
    input:
        checkpoint=checkpoint_input,
    output:
        "results/sizes/{model}/{method}/{sparsity}.json",
    params:
        codecs=config["sizes"]["codecs"],
        chunk_bytes=config["sizes"]["chunk_mib"] * 2**20,
    log:
        "logs/measure_size/{model}/{method}/{sparsity}.log",
    benchmark:
        "logs/measure_size/{model}/{method}/{sparsity}.benchmark.tsv"
    script:
        "../scripts/measure_size.py"


rule plot_histograms:
    input:
        checkpoint=checkpoint_input,
    output:
        model=report(
            "results/histograms/{model}/{method}/{sparsity}-all.png",
            caption="../report/histogram_all.rst",
            category="Weight histograms",
            subcategory="{model}",
            labels={"model": "{model}", "method": "{method}", "sparsity": "{sparsity}", "figure": "all weights"},
        ),
        layers=report(
            "results/histograms/{model}/{method}/{sparsity}-layers.png",
            caption="../report/histogram_layers.rst",
            category="Weight histograms",
            subcategory="{model}",
            labels={"model": "{model}", "method": "{method}", "sparsity": "{sparsity}", "figure": "per layer"},
        ),
        counts="results/histograms/{model}/{method}/{sparsity}.json",
    params:
        bins=config["histograms"]["bins"],
        include_embeddings=config["pruning"]["include_embeddings"],
    log:
        "logs/plot_histograms/{model}/{method}/{sparsity}.log",
    script:
        "../scripts/plot_histograms.py"
