# Publishing needs the network, which on clusters only login nodes have: a local rule.
localrules:
    push_to_hub,


rule push_to_hub:
    input:
        unpack(hub_inputs),
    output:
        card="results/{run}/hub/README.md",
        record="results/{run}/hub/upload.json",
    log:
        "logs/push_to_hub/{run}.log",
    conda:
        "../../envs/hub.yaml"
    params:
        settings=settings_of(
            "hub",
            "dataset",
            "model",
            "data",
            "lora",
            "quantization",
            "fsdp",
            "training",
            "evaluate",
        ),
    script:
        "../scripts/push_to_hub.py"
