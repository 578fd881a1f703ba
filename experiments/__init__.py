"""swiftlm experiments: launch, generate and sweep entry points, configs and benchmarks."""
