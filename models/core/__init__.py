"""Building blocks shared by every swiftlm model: norms, rotary embeddings, MLPs, embeddings,
attention with a ragged KV cache, and the model protocol types."""
