# Pruning: the only rule that writes checkpoints. Sparsity 0 goes through the same code path, so
# every downstream rule treats all levels alike.


rule prune:
    input:
        source="results/models/{model}.json",
    output:
        checkpoint=checkpoint_output(),
    params:
        sparsity=lambda wildcards: sparsity_from_label(wildcards.sparsity),
        include_embeddings=config["pruning"]["include_embeddings"],
        trust_remote_code=lambda wildcards: model_entry(wildcards)["trust_remote_code"],
        family=lambda wildcards: model_entry(wildcards)["family"],
    log:
        "logs/prune/{model}/{method}/{sparsity}.log",
    benchmark:
        "logs/prune/{model}/{method}/{sparsity}.benchmark.tsv"
    script:
        "../scripts/prune.py"
