# Fetching needs the network, which on clusters only login nodes have: local rules.
localrules:
    fetch_dataset,
    fetch_model,


rule fetch_dataset:
    input:
        dataset_source_file,
    output:
        directory("resources/datasets/{dataset}"),
    log:
        "logs/fetch_dataset/{dataset}.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=dataset_spec,
    script:
        "../scripts/fetch_dataset.py"


rule fetch_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=model_spec,
    script:
        "../scripts/fetch_model.py"
