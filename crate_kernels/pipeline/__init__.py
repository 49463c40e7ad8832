"""The layer below every command (train, and the evaluation commands): datasets, augmentation and the
deterministic sharded sampler (data), shared flags (flags), the run loop (run), torchrun integration (distributed),
and run logs (monitor). It imports only the layers below it (errors, checkpoint, ops, models)."""
