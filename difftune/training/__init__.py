"""Machinery shared by the training scripts (train_scripts/): options, data, model families,
class-image generation, checkpoints, validation samples and model cards."""
