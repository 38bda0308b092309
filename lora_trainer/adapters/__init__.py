"""Adapters on SDXL's parts through PEFT: attaching them per part, their trainable parameters, their weights."""
