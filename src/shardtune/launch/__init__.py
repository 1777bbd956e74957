"""Starting training: the Accelerate config, cluster resources, the launcher, allocator, CPU FSDP patch."""
