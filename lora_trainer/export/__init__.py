"""The LoRA file: kohya's SDXL key names (LDM layout for the UNet), the metadata UIs read, writing it, and
reading it back into live adapters. The format is described in docs/lora-format.md."""
