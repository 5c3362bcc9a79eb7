"""The training loop: config, model and optimizer set-up, the step, checkpoints and logging."""
