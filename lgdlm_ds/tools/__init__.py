"""Tools off the training path: benchmarks, memory predictor, plots."""
