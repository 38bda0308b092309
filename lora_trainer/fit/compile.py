"""`training.compile`: torch.compile on the UNet's repeated transformer blocks (regional compilation).

Compiling the whole UNet traces about 2,000 modules and recompiles all of it for every new bucket shape; past
dynamo's recompile limit (8 per function) it silently runs eager. SDXL's UNet instead repeats one module type,
diffusers' BasicTransformerBlock, 70 times: compiled per block, every block runs the same compiled code (dynamo
keys its cache on the function, and the weights are inputs), so a run compiles a few small graphs, and a
second shape makes dynamo compile the sizes as dynamic rather than once per bucket.
"""

from __future__ import annotations

import torch

from lora_trainer.errors import UserError

# Distinct graphs one block may need: channel widths, training vs. no-grad evaluation, static then dynamic sizes.
RECOMPILE_LIMIT = 32


def compile_transformer_blocks(unet: torch.nn.Module, backend: str) -> int:
    """Compile each transformer block of `unet` in place; the number of blocks."""
    import torch._dynamo
    from diffusers.models.attention import BasicTransformerBlock

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [module for module in unet.modules() if isinstance(module, BasicTransformerBlock)]
    try:
        for block in blocks:
            block.compile(backend=backend)
    except torch._dynamo.exc.InvalidBackend:
        known = ", ".join(torch._dynamo.list_backends(exclude_tags=()))
        raise UserError(f"training.compile_backend: {backend!r} is not a torch.compile backend; use one of {known}") from None
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
