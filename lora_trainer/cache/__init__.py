"""What a run computes once and keeps on disk: VAE latents and text embeddings, keyed by content fingerprints,
and the one cache-filling path that `cache-latents` and training share."""
