"""Benchmark helpers: offline text-classification tasks for measuring T-Switch on real models."""
