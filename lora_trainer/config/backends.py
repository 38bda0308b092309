"""Whether bitsandbytes can run its 8-bit optimizers on the device training will use, asked when the config loads.

bitsandbytes imports fine without a usable native library and fails only at the first optimizer step, i.e. after
the model loaded and the caches filled. On a GPU machine its CUDA kernels call the native library, which
`bitsandbytes.cextension.lib` is (a `compiled_with_cuda` one) or a stand-in for when none loaded (no build for this
CUDA version, a missing runtime). On the CPU its 8-bit optimizer is a torch operator with a CPU kernel (native or
plain torch).
"""

from __future__ import annotations

import logging
import warnings

# The torch operator bitsandbytes' 8-bit optimizers step through in 0.50; a
# release without this operator counts as having no CPU kernel.
_EIGHT_BIT_OPERATOR = "bitsandbytes::optimizer_update_8bit_blockwise"


def training_device_type() -> str:
    """`cuda` where training will run on a GPU, else `cpu` (as Accelerate picks the device)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bitsandbytes_problem(device_type: str) -> str | None:
    """What keeps bitsandbytes' 8-bit optimizers from running on `device_type` (`cuda` or `cpu`), or None."""
    try:
        bitsandbytes = _import_quietly()
    except Exception as error:  # a broken native library surfaces as many kinds of error
        return f"bitsandbytes failed to load ({_first_line(error)})"
    version = getattr(bitsandbytes, "__version__", "?")
    if device_type == "cuda":
        from bitsandbytes import cextension

        if getattr(cextension.lib, "compiled_with_cuda", False):
            return None
        import torch

        return f"bitsandbytes {version} has no native library for this machine's CUDA {torch.version.cuda}"
    if not _has_cpu_kernel(_EIGHT_BIT_OPERATOR):
        return f"bitsandbytes {version} has no CPU kernel for its 8-bit optimizers"
    return None


def _import_quietly():
    """Import bitsandbytes without its load-failure log (a traceback) or warnings: the caller says it in one line."""
    library_log = logging.getLogger("bitsandbytes")
    level = library_log.level
    library_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    finally:
        library_log.setLevel(level)
    return bitsandbytes


def _has_cpu_kernel(operator: str) -> bool:
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(operator, "CPU")
    except RuntimeError:  # no such operator: a bitsandbytes from before it
        return False


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
