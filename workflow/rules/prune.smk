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
        # Each method gets only the settings it reads, so changing the calibration settings
        # does not re-run magnitude pruning.
        seed=lambda wildcards: config["pruning"]["seed"] if method_reads(wildcards, "seed") else None,
        calibration=lambda wildcards: config["pruning"]["calibration"] if method_reads(wildcards, "calibration") else None,
        sparsegpt=lambda wildcards: config["pruning"]["sparsegpt"] if method_reads(wildcards, "sparsegpt") else None,
        data_settings=lambda wildcards: config["data"]["clm"] if method_reads(wildcards, "calibration") else None,
        local_dir=lambda wildcards: DATA_DIR if method_reads(wildcards, "calibration") else None,
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
