rule convert_checkpoint:
    input:
        unpack(run_inputs),
        done="results/{run}/train/done.json",
    output:
        directory("results/{run}/adapter"),
    log:
        "logs/convert_checkpoint/{run}.log",
    benchmark:
        "benchmarks/convert_checkpoint/{run}.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        settings=settings_of("model", "quantization", "convert"),
    script:
        "../scripts/convert_checkpoint.py"
