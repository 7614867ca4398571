"""Accuracy and speed of built artifacts on real images: datasets, scoring with paired intervals, latency."""
