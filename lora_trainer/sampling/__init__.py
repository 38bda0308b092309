"""Drawing images with a base model plus LoRAs: the pipeline, sampler schedulers, and A1111's PNG infotext."""
