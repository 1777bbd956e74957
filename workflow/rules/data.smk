# Keyed by everything it depends on, so runs sharing inputs share one prepared data set.
rule prepare_data:
    input:
        unpack(prepared_inputs),
    output:
        directory("resources/prepared/{prepared}"),
    params:
        settings=prepared_settings,
    threads: 2
    log:
        "logs/prepare_data/{prepared}.log",
    benchmark:
        "benchmarks/prepare_data/{prepared}.tsv"
    script:
        "../scripts/prepare_data.py"
