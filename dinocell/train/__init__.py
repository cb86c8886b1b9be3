"""Self-supervised training: meta-architecture, optimiser and schedules, checkpoints, and the training loop."""
