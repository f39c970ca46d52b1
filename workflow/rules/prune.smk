# Pruning: the only rule that writes checkpoints. Sparsity 0 goes through the same code path, so
# every downstream rule treats all levels alike.


rule prune:
    input:
        unpack(calibration_input),
        source="results/models/{model}.json",
    output:
        checkpoint=checkpoint_output(),
    params:
        sparsity=lambda wildcards: sparsity_from_label(wildcards.sparsity),
        include_embeddings=config["pruning"]["include_embeddings"],
        trust_remote_code=lambda wildcards: model_entry(wildcards)["trust_remote_code"],
        family=lambda wildcards: model_entry(wildcards)["family"],
        seed=config["pruning"]["seed"],
        calibration=config["pruning"]["calibration"],
        sparsegpt=config["pruning"]["sparsegpt"],
        data_settings=config["data"]["clm"],
        local_dir=DATA_DIR,
    log:
        "logs/prune/{model}/{method}/{sparsity}.log",
    benchmark:
        "logs/prune/{model}/{method}/{sparsity}.benchmark.tsv"
    resources:
        # Calibrated methods (wanda, sparsegpt, structured-ffn) run each layer on a GPU when one
        # is there; the others need none.
        gpu=lambda wildcards: 1 if method_spec(wildcards.method).calibrated else 0,
    script:
        "../scripts/prune.py"
