"""Machinery shared by the training scripts (train_scripts/): options, data, the training loop,
class-image generation, checkpoints, tracker logging and model cards. What differs between model
families is the families' (difftune.families)."""
