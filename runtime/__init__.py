"""What every agent shares: config, replay, training loop, logging, checkpoints."""
