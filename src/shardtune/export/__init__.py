"""From sharded checkpoints to artifacts: the adapter (converted and verified) and the merged model."""
