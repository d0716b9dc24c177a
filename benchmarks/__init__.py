"""Benchmarks of the training pipeline against the machine and a plain-Keras baseline."""
