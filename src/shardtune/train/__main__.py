from shardtune.train.entry import cli

cli()
