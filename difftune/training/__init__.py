"""Machinery shared by the trainers (difftune/commands/): settings and flags, data, the training loop,
class-image generation, checkpoints, tracker logging and model cards. What differs between model
families is the families' (difftune.families)."""
