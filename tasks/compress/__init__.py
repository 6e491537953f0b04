"""Compress stage: encode curated clips to normalised VAE latents + T5 caption features (a LatentDataset)."""
