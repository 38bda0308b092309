"""SDXL itself: loading its parts once per run, its text conditioning and latent scaling, its precision,
and the builtin models with SDXL's layout."""
