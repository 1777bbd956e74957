from shardtune.launch.launcher import cli

cli()
