"""From folders on disk to planned images: records, captions, pictures and buckets, and what one epoch
trains on. No models here: caching them is `lora_trainer.cache`."""
