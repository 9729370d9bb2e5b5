"""The reference trainer (fastssl.train): data, augmentations, GradCache, checkpoints and the CLI."""
