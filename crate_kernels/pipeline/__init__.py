"""The layer below every command (train, finetune, probe, analyze): datasets, transforms and the deterministic sharded
sampler (data: images, datasets, sampling, labelled), fine-tuning's recipe (recipe), the flags the commands share and
their entry point (flags), the training engine (run), torchrun integration (distributed), and run logs (monitor).
It imports only the layers below it (errors, checkpoint, ops, models)."""
