"""swiftlm training: tokenizers, datasets and the grain input pipeline, trainer, checkpoints."""
