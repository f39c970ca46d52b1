# Model sources: hub ids, local folders and folders inside installed packages become local folders.


# Runs on the submitting host (localrule), which is the one with hub access on most clusters;
# every rule after it reads only local files, so compute jobs can run with the hub offline.
rule resolve_model:
    output:
        "results/models/{model}.json",
    params:
        source=lambda wildcards: model_entry(wildcards)["source"],
        cache_dir=config["hub_cache"],
    log:
        "logs/resolve_model/{model}.log",
    localrule: True
    script:
        "../scripts/resolve_model.py"
