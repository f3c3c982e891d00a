"""Evaluation metrics: FID/KID, CLIP score, CLIP-I/CLIP-T, DINO, VLHI."""
