"""Images and captions in, cached training latents out."""
