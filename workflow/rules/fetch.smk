# Fetching needs the network, which on clusters only login nodes have: local rules.
localrules:
    fetch_dataset,
    fetch_model,


rule fetch_dataset:
    output:
        directory("resources/datasets/{dataset}"),
    params:
        spec=dataset_spec,
    log:
        "logs/fetch_dataset/{dataset}.log",
    script:
        "../scripts/fetch_dataset.py"


rule fetch_model:
    output:
        directory("resources/models/{model}"),
    params:
        spec=model_spec,
    log:
        "logs/fetch_model/{model}.log",
    script:
        "../scripts/fetch_model.py"
