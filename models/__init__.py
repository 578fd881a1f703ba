"""swiftlm models: Flax NNX language models sharing one decoding protocol (see DESIGN.md)."""
