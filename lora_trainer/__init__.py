"""lora-train: a LoRA trainer for Stable Diffusion XL."""

__version__ = "0.1.0"
