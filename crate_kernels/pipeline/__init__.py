"""The layer below every command (train, and the evaluation commands): datasets, augmentation and the
deterministic sharded sampler (data), crash-safe checkpoints, RNG state and the output-directory lock
(checkpoint), torchrun integration (distributed), and run logs (monitor). It imports nothing above it."""
