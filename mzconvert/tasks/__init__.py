"""What a model's outputs mean, per task: detection decode and matching, classification labels, dense maps, signal."""
