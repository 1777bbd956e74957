# Keyed by everything it depends on, so runs sharing inputs share one prepared data set.
rule prepare_data:
    input:
        unpack(prepared_inputs),
    output:
        directory("resources/prepared/{prepared}"),
    log:
        "logs/prepare_data/{prepared}.log",
    benchmark:
        "benchmarks/prepare_data/{prepared}.tsv"
    conda:
        "../../envs/data.yaml"
    threads: 2
    params:
        settings=prepared_settings,
    script:
        "../scripts/prepare_data.py"
