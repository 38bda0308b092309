"""No optimizer update after a non-finite loss, decided on the device, so no step has to wait for the GPU.

Reading a loss back to the host (`loss.item()`) makes the CPU wait until the GPU has finished the step, and
the GPU then idles while the CPU prepares the next one. The loop reads losses only at the logging cadence
(`fit.pending_losses`); until then this guard keeps the adapters where the last finite loss left them. Its flag
trips at the first non-finite loss and stays tripped, so when the loop reads the losses and stops, the weights
are those of the last good step: the LoRA it saves.

How an update is held back depends on the optimizer:
- `found_inf`: torch's fused optimizers (AdamW, SGD: `adamw` and `sgdnesterov`, fused by default) take the flag
  as their `found_inf` and skip the update in their own kernel, the way GradScaler drives them: nothing is read
  back and nothing is copied.
- `scaled`: fp16 with loss scaling. A tripped flag turns the loss into NaN before backward, so every gradient is
  non-finite and the GradScaler skips the step, as it skips an overflow.
- `wait`: every other optimizer (bitsandbytes' 8-bit ones, Lion, Prodigy, Adafactor, CAME, schedule-free) has no
  way to skip inside its step, so the flag is read before each update, as every step used to. Undoing their
  update instead would need a copy of the adapters on the GPU (340 MB for SDXL at rank 32), the memory an 8-bit
  optimizer is chosen to save; and schedule-free optimizers save an average kept in their state, which a NaN
  step would spoil even with the weights restored.
"""

from __future__ import annotations

from typing import Any

import torch

def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the real one


def guard_mode(optimizer: Any, loss_scaling: bool) -> str:
    inner = _inner(optimizer)
    if loss_scaling:
        return "scaled"
    if getattr(inner, "_step_supports_amp_scaling", False) and inner.defaults.get("fused"):
        return "found_inf"
    return "wait"


class UpdateGuard:
    def __init__(self, optimizer: Any, device: torch.device, loss_scaling: bool, processes: int = 1):
        self.mode = guard_mode(optimizer, loss_scaling)
        self.processes = processes
        self.tripped = torch.zeros((), device=device)  # 1.0 once any loss was not finite

    def observe(self, loss: torch.Tensor) -> None:
        """Trip on a non-finite loss of this process, or (with several) of any: they all skip alike."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.processes > 1:
            import torch.distributed as distributed

            distributed.all_reduce(bad, op=distributed.ReduceOp.MAX)  # queued on the device; nothing waits for it
        self.tripped = torch.maximum(self.tripped, bad)

    def loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        if self.mode != "scaled":
            return loss
        return loss * torch.where(self.tripped > 0, torch.nan, 1.0)

    def step(self, optimizer: Any, sync_gradients: bool) -> None:
        """`optimizer.step()`, held back once the flag has tripped."""
        if not sync_gradients or self.mode == "scaled":
            optimizer.step()
        elif self.mode == "found_inf":
            self._step_with_found_inf(optimizer)
        elif not self.tripped.item():  # wait: the one read of a step, for optimizers that cannot skip by themselves
            optimizer.step()

    def _step_with_found_inf(self, optimizer: Any) -> None:
        inner = _inner(optimizer)
        inner.found_inf, inner.grad_scale = self.tripped, None  # what GradScaler hands a fused optimizer
        try:
            optimizer.step()
        finally:
            del inner.found_inf, inner.grad_scale
