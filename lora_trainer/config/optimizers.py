"""The optimizers `training.optimizer` names: the class behind each, the `optimizer_args` it takes, and which
`training` fields feed it.

This module imports no optimizer package, so `optimizer_args` is checked the moment the config loads (a typo is an
error before any model loads); tests/test_optimizers.py holds the table to each class's real `inspect.signature`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from lora_trainer.config.backends import bitsandbytes_problem, training_device_type

# A config.training.TrainingConfig, which imports this module for its checks, so its name cannot be imported here.
TrainingConfig = Any


@dataclass(frozen=True)
class Numbers:
    """A list of `count` numbers in the config, handed to the optimizer as a tuple (Lion's or CAME's betas)."""

    count: int


ArgType = type | Numbers  # bool, int, float (an integer is accepted for it too), or Numbers


@dataclass(frozen=True)
class OptimizerSpec:
    implementation: str
    """The class make_optimizer builds, as `module.Class`."""
    args: dict[str, ArgType]
    """What `training.optimizer_args` may set, with its type."""
    shortcuts: tuple[str, ...]
    """Constructor arguments filled from `training` fields (SHORTCUT_FIELDS); never from optimizer_args."""
    preset: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments make_optimizer sets itself; those also in `args` may be overridden there."""
    eight_bit: bool = False
    """Runs on bitsandbytes' native kernels, which are checked for the training device when the config loads."""


# The constructor argument each shortcut fills, and the training field it comes from.
SHORTCUT_FIELDS = {"betas": "adam_betas", "eps": "adam_epsilon", "weight_decay": "weight_decay"}
_ADAM = ("betas", "eps", "weight_decay")
_DECAY_ONLY = ("weight_decay",)

OPTIMIZERS: dict[str, OptimizerSpec] = {
    # torch's fused kernels: one launch for every adapter, and the update guard (fit.update_guard) skips a step inside
    # them without reading anything back.
    "adamw": OptimizerSpec("torch.optim.AdamW", {"amsgrad": bool, "fused": bool}, _ADAM, preset={"fused": True}),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim.AdamW8bit", {"min_8bit_size": int}, _ADAM, eight_bit=True),
    # On the CPU bitsandbytes runs it unpaged, as adamw8bit (it warns once): paging moves states to CPU RAM, which
    # only means something on a GPU.
    "pagedadamw8bit": OptimizerSpec("bitsandbytes.optim.PagedAdamW8bit", {"min_8bit_size": int}, _ADAM, eight_bit=True),
    # pytorch-optimizer's Lion rather than bitsandbytes' 32-bit one: plain torch, so `lion` runs on any device without
    # a native library, as kohya's Lion (lion-pytorch) does.
    "lion": OptimizerSpec("pytorch_optimizer.Lion", {"betas": Numbers(2), "weight_decouple": bool, "fixed_decay": bool}, _DECAY_ONLY),
    "lion8bit": OptimizerSpec("bitsandbytes.optim.Lion8bit", {"betas": Numbers(2), "min_8bit_size": int}, _DECAY_ONLY, eight_bit=True),
    "prodigy": OptimizerSpec(
        "prodigyopt.Prodigy",
        {"beta3": float, "decouple": bool, "use_bias_correction": bool, "safeguard_warmup": bool, "d0": float,
         "d_coef": float, "growth_rate": float, "slice_p": int},
        _ADAM,
    ),
    # Adafactor's eps is a pair (for the squared gradient and for the parameter scale), not Adam's epsilon.
    "adafactor": OptimizerSpec(
        "transformers.optimization.Adafactor",
        {"eps": Numbers(2), "clip_threshold": float, "decay_rate": float, "beta1": float, "scale_parameter": bool,
         "relative_step": bool, "warmup_init": bool},
        _DECAY_ONLY,
        preset={"relative_step": False, "scale_parameter": False, "warmup_init": False},
    ),
    # CAME has three betas (the third for its confidence term), so it is outside the Adam family's shortcut.
    "came": OptimizerSpec(
        "pytorch_optimizer.CAME",
        {"betas": Numbers(3), "weight_decouple": bool, "fixed_decay": bool, "clip_threshold": float, "ams_bound": bool,
         "eps1": float, "eps2": float},
        _DECAY_ONLY,
    ),
    "adamwschedulefree": OptimizerSpec(
        "schedulefree.AdamWScheduleFree", {"warmup_steps": int, "r": float, "weight_lr_power": float}, _ADAM
    ),
    # kohya's SGDNesterov: momentum 0.9 unless set; torch refuses Nesterov with dampening, so that is not offered.
    "sgdnesterov": OptimizerSpec(
        "torch.optim.SGD", {"momentum": float, "fused": bool}, _DECAY_ONLY, preset={"nesterov": True, "momentum": 0.9, "fused": True}
    ),
}

SCHEDULE_FREE = ("adamwschedulefree",)


def uses_own_learning_rate(config: TrainingConfig) -> bool:
    """Adafactor in its relative-step mode, which sets its own step size (Shazeer & Stern 2018, section 8): the
    configured learning rates and schedule do not apply, and the schedule is transformers' `AdafactorSchedule`."""
    return config.optimizer == "adafactor" and config.optimizer_args.get("relative_step") is True


def optimizer_options(config: TrainingConfig) -> dict[str, Any]:
    """The keyword arguments of the optimizer's constructor besides the parameter groups: the learning rate, the
    preset, the shortcut fields, then `optimizer_args` (lists as tuples)."""
    spec = OPTIMIZERS[config.optimizer]
    options: dict[str, Any] = {"lr": None if uses_own_learning_rate(config) else config.learning_rate, **spec.preset}
    options.update({name: getattr(config, SHORTCUT_FIELDS[name]) for name in spec.shortcuts})
    if config.optimizer in SCHEDULE_FREE and config.lr_warmup_steps:
        options["warmup_steps"] = config.lr_warmup_steps  # its own warmup; the schedule then stays constant
    options.update({name: tuple(value) if isinstance(value, list) else value for name, value in config.optimizer_args.items()})
    return options


def optimizer_settings_problem(config: TrainingConfig) -> str | None:
    """The first thing wrong with the optimizer settings, as `field: what is wrong; what to do`, or None."""
    for check in (_schedule_free_problem, _adam_shortcut_problem, _optimizer_args_problem, _backend_problem):
        problem = check(config)
        if problem:
            return problem
    return None


def _schedule_free_problem(config: TrainingConfig) -> str | None:
    """Schedule-free optimizers replace the decaying schedule by averaging (Defazio et al. 2024) and warm up
    themselves: `constant` takes none, `constant_with_warmup` hands `lr_warmup_steps` to the optimizer's own
    `warmup_steps`, so a config written for AdamW runs with only the optimizer changed."""
    if config.optimizer not in SCHEDULE_FREE:
        return None
    if config.lr_scheduler not in ("constant", "constant_with_warmup"):
        return (
            f"lr_scheduler: {config.optimizer} follows no decaying schedule ({config.lr_scheduler}), it averages its weights "
            "instead; set lr_scheduler: constant, or constant_with_warmup with lr_warmup_steps for its own warmup"
        )
    if isinstance(config.lr_warmup_steps, float):
        return f"lr_warmup_steps: {config.optimizer} warms up over a number of steps; give lr_warmup_steps in steps, not a fraction"
    if config.lr_warmup_steps and "warmup_steps" in config.optimizer_args:
        return "optimizer_args.warmup_steps: repeats lr_warmup_steps, which schedule-free optimizers take as theirs; give one of them"
    if config.ema.enabled:
        # The EMA would average the training-mode weights, not the averaged ones the method saves.
        return f"ema: {config.optimizer} already averages its weights (they are what it saves); set training.ema.enabled: false"
    return None


def _adam_shortcut_problem(config: TrainingConfig) -> str | None:
    """`adam_betas` / `adam_epsilon` changed for an optimizer they do not feed. Only a value other than the default
    counts: the resolved config saved beside each LoRA lists every default, and must load again."""
    spec = OPTIMIZERS[config.optimizer]
    for argument in ("betas", "eps"):
        field_name = SHORTCUT_FIELDS[argument]
        if argument in spec.shortcuts or field_name not in config.model_fields_set:
            continue
        if getattr(config, field_name) == type(config).model_fields[field_name].default:
            continue
        if argument in spec.args:
            fix = f"put its {argument} in optimizer_args.{argument} ({_describe(spec.args[argument])})"
        else:
            fix = f"it takes no {argument}, so remove {field_name}"
        return f"{field_name}: only the Adam family ({', '.join(adam_family())}) uses it, not {config.optimizer}; {fix}"
    return None


def _optimizer_args_problem(config: TrainingConfig) -> str | None:
    spec = OPTIMIZERS[config.optimizer]
    for name, value in config.optimizer_args.items():
        where = f"optimizer_args.{name}"
        if name == "lr":
            return f"{where}: the learning rate is training.learning_rate (and network.text_encoder_learning_rate); set it there"
        if name in spec.shortcuts:
            return f"{where}: {config.optimizer} takes its {name} from training.{SHORTCUT_FIELDS[name]}; set it there"
        if name not in spec.args:
            return f"{where}: {_unknown_argument(name, config.optimizer, spec)}"
        if not _has_type(value, spec.args[name]):
            return f"{where}: {config.optimizer}'s {name} must be {_describe(spec.args[name])}, got {value!r}"
    return None


def _backend_problem(config: TrainingConfig) -> str | None:
    if not OPTIMIZERS[config.optimizer].eight_bit:
        return None
    device = training_device_type()
    problem = bitsandbytes_problem(device)
    if problem is None:
        return None
    return (
        f"optimizer: {config.optimizer} needs bitsandbytes' native {device.upper()} kernels, but {problem}; install a "
        "bitsandbytes build for this machine (pip install -U bitsandbytes) or use adamw"
    )


def adam_family() -> list[str]:
    """The optimizers `adam_betas` and `adam_epsilon` feed."""
    return [name for name, spec in OPTIMIZERS.items() if "betas" in spec.shortcuts]


def _unknown_argument(name: str, optimizer: str, spec: OptimizerSpec) -> str:
    message = f"{optimizer} takes no argument {name!r}"
    close = difflib.get_close_matches(name, list(spec.args), n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    allowed = ", ".join(spec.args) or "none"
    fields = ", ".join(SHORTCUT_FIELDS[argument] for argument in spec.shortcuts)
    return f"{message} (allowed: {allowed}; learning_rate and {fields} are training fields of their own)"


def is_argument_value(value: Any) -> bool:
    """Whether `value` is of a kind an optimizer argument can have: true/false, a number, a text, a list of numbers."""
    return isinstance(value, (bool, int, float, str)) or isinstance(value, list) and all(_is_number(item) for item in value)


def _has_type(value: Any, expected: ArgType) -> bool:
    if isinstance(expected, Numbers):
        return isinstance(value, list) and len(value) == expected.count and all(_is_number(item) for item in value)
    if expected is float:
        return _is_number(value)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(expected: ArgType) -> str:
    if isinstance(expected, Numbers):
        return f"a list of {expected.count} numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text string"}[expected]


def kohya_optimizer_name(config: TrainingConfig) -> str:
    """The optimizer as kohya writes `ss_optimizer`: its class path, with the arguments beyond the learning rate,
    e.g. `bitsandbytes.optim.AdamW8bit(betas=(0.9, 0.999),eps=1e-08,weight_decay=0.01)`."""
    options = {name: value for name, value in optimizer_options(config).items() if name != "lr"}
    arguments = ",".join(f"{name}={value}" for name, value in options.items())
    implementation = OPTIMIZERS[config.optimizer].implementation
    return f"{implementation}({arguments})" if arguments else implementation
