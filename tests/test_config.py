"""Config validation: shipped YAMLs are valid; bad values name the field, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO, run_cli, write_yaml

from lora_trainer.config.load import dump_config, load_config, parse_config
from lora_trainer.config.schema import Config

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {path.name for path in SHIPPED} >= {"quickstart.yaml", "sdxl_lora.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # dataset paths in shipped configs are relative to the repository root
    config = load_config(path)
    assert isinstance(config, Config)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# lora-train train configs/"), "each config opens with the command that runs it"


def test_defaults_are_what_an_sdxl_lora_user_expects(raw_config):
    config = parse_config({"model": raw_config["model"], "datasets": raw_config["datasets"]})
    assert (config.network.rank, config.network.alpha) == (32, 16.0)
    assert config.data.resolution == 1024
    assert config.training.optimizer == "adamw"
    assert config.training.mixed_precision == "auto"
    assert config.datasets[0].caption_extensions == (".txt", ".caption")
    assert config.data.buckets and config.data.bucket_step == 64
    assert (config.data.smallest_side, config.data.largest_side) == (256, 2048)
    assert config.data.cache_latents and config.data.on_bad_image == "skip"
    assert config.model.prediction_type is None  # from the model: its file or scheduler config


def test_resolved_config_round_trips(raw_config, tmp_path):
    config = parse_config(raw_config)
    again = parse_config(yaml.safe_load(dump_config(config)))
    assert again == config


def test_config_is_frozen(raw_config):
    config = parse_config(raw_config)
    with pytest.raises(Exception):
        config.network.rank = 3


def test_kohya_optimizer_spelling_is_accepted(raw_config):
    raw_config["training"]["optimizer"] = "AdamW8bit"
    assert parse_config(raw_config).training.optimizer == "adamw8bit"


def _with(raw: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[last] = value
    return raw


WARMUP_RULE = "must be a whole number of optimizer steps (0: none) or a fraction of the run between 0 and 1"
BAD_VALUES = [
    ("network.rank", -4, "network.rank: must be a positive integer, got -4"),
    ("network.rank", "big", "network.rank: must be an integer, got 'big'"),
    ("network.alpha", 0, "network.alpha: must be greater than 0, got 0"),
    ("network.dropout", 1.5, "network.dropout: must be less than 1.0, got 1.5"),
    ("network.rnak", 8, "network.rnak: unknown field 'rnak'; did you mean 'rank'?"),
    ("network.network_dim", 8, "network.network_dim: unknown field 'network_dim'; kohya's network_dim is network.rank here"),
    ("network.down_lr_weight", [1, 1, 1], "network.down_lr_weight: needs 9 weights (one per block), got 3"),
    ("network.mid_lr_weight", [1, -0.5, 1], "network.mid_lr_weight: weights must be 0 or more (0 leaves a block untrained), got -0.5"),
    ("network.up_lr_weight", "sin", "network.up_lr_weight: unknown preset 'sin'; give 9 weights, 0 or more, or a preset (sine, cosine"),
    ("network.mid_lr_weight", "sine", "network.mid_lr_weight: must be a list of 3 weights, 0 or more, got 'sine'"),
    ("network.down_lr_weight", "1,1,1,1,1,1,1,1,x", "network.down_lr_weight: must be 9 weights, 0 or more, or a preset"),
    ("network.loraplus_lr_ratio", 0, "network.loraplus_lr_ratio: must be greater than 0, got 0"),
    ("network.loraplus_unet_lr_ratio", -2, "network.loraplus_unet_lr_ratio: must be greater than 0, got -2"),
    ("network.scale_weight_norms", 0, "network.scale_weight_norms: must be greater than 0, got 0"),
    ("training.loraplus_lr_ratio", 16, "training.loraplus_lr_ratio: unknown field 'loraplus_lr_ratio'; kohya's loraplus_lr_ratio is network.loraplus_lr_ratio here"),
    ("training.optimizer", "sgd", "training.optimizer: must be one of adamw, adamw8bit, pagedadamw8bit, lion, lion8bit, prodigy, "
     "adafactor, came, adamwschedulefree or sgdnesterov, got 'sgd'"),
    ("training.optimizer", "DAdaptAdam", "training.optimizer: must be one of adamw, adamw8bit, pagedadamw8bit, lion,"),
    ("training.optimizer_args", {"amsgrd": True},
     "training.optimizer_args.amsgrd: adamw takes no argument 'amsgrd'; did you mean 'amsgrad'? (allowed: amsgrad, fused;"),
    ("training.optimizer_args", {"betas": [0.9, 0.99]},
     "training.optimizer_args.betas: adamw takes its betas from training.adam_betas; set it there"),
    ("training", {"optimizer": "Lion", "adam_betas": [0.9, 0.99]},
     "training.adam_betas: only the Adam family (adamw, adamw8bit, pagedadamw8bit, prodigy, adamwschedulefree) uses it, not "
     "lion; put its betas in optimizer_args.betas (a list of 2 numbers)"),
    ("training", {"optimizer": "AdamWScheduleFree", "lr_scheduler": "cosine"},
     "training.lr_scheduler: adamwschedulefree follows no decaying schedule (cosine), it averages its weights instead; "
     "set lr_scheduler: constant, or constant_with_warmup with lr_warmup_steps for its own warmup"),
    ("training.mixed_precision", "fp8", "training.mixed_precision: must be one of auto, no, fp16 or bf16, got 'fp8'"),
    ("training.lr_scheduler", "cosine_annealing", "training.lr_scheduler: must be one of constant, constant_with_warmup"),
    ("training.lr_warmup_steps", 10, "training.lr_warmup_steps: 10 warmup steps need a schedule that warms up"),
    ("training.lr_warmup_steps", 0.1, "training.lr_warmup_steps: a warmup over 0.1 of the run needs a schedule that warms up"),
    ("training.lr_warmup_steps", 1.5, f"training.lr_warmup_steps: {WARMUP_RULE}, got 1.5"),
    ("training.lr_warmup_steps", -3, f"training.lr_warmup_steps: {WARMUP_RULE}, got -3"),
    ("training.lr_warmup_steps", "soon", f"training.lr_warmup_steps: {WARMUP_RULE}, got 'soon'"),
    ("training.lr_scheduler_num_cycles", 3, "training.lr_scheduler_num_cycles: only lr_scheduler cosine_with_restarts uses it,"),
    ("training.lr_scheduler_power", 2.0, "training.lr_scheduler_power: only lr_scheduler polynomial uses it, this run's is constant;"),
    ("training.lr_scheduler_min_lr_ratio", 0.1, "training.lr_scheduler_min_lr_ratio: only lr_scheduler cosine uses it, this run's is"),
    ("training.lr_scheduler_min_lr_ratio", 1.0, "training.lr_scheduler_min_lr_ratio: must be less than 1.0, got 1.0"),
    ("training.batch_size", 0, "training.batch_size: must be a positive integer, got 0"),
    ("training.gradient_checkpointing", "maybe", "training.gradient_checkpointing: must be true or false, got 'maybe'"),
    ("training.adam_betas", [0.9, 1.5], "training.adam_betas: must be two numbers in [0, 1), got [0.9, 1.5]"),
    ("training.ema.decay", 1.0, "training.ema.decay: must be less than 1.0, got 1.0"),
    ("training.ema.decay", 0, "training.ema.decay: must be greater than 0, got 0"),
    ("training.ema.update_every_n_steps", 0, "training.ema.update_every_n_steps: must be a positive integer, got 0"),
    ("training.ema.decay", 0.99, "training.ema.decay: the EMA is off, so decay does nothing; set training.ema.enabled: true, or remove decay"),
    ("data.resolution", 1000, "data.resolution: must be a multiple of 64 (SDXL's UNet needs it), got 1000"),
    ("datasets.0.path", "/no/such/folder", "datasets.0.path: folder not found: /no/such/folder"),
    ("datasets.0.repeats", 0, "datasets.0.repeats: must be a positive integer, got 0"),
    ("datasets.0.caption_extension", "txt", "datasets.0.caption_extension: must be a file extension starting with '.'"),
    ("datasets.0.mask_dir", "/no/such/folder", "datasets.0.mask_dir: folder not found: /no/such/folder"),
    ("datasets.0.alpha_mask", True, "datasets.0.alpha_mask: masks weigh the loss only with objective.masked_loss: true"),
    ("objective.masked_loss", True, "objective.masked_loss: no dataset gives masks; set datasets.N.alpha_mask: true"),
    ("model.pretrained", "builtin:huge-sdxl", "model.pretrained: unknown builtin model 'builtin:huge-sdxl'"),
    ("model.pretrained", "./not/here", "model.pretrained: no such file or folder: "),
    ("model.prediction_type", "x0", "model.prediction_type: must be one of epsilon or v_prediction, got 'x0'"),
    ("objective.loss_type", "mse", "objective.loss_type: must be one of l2, l1, huber or smooth_l1, got 'mse'"),
    ("objective.huber_c", 0.2, "objective.huber_c: applies only with loss_type huber or smooth_l1; set that too, or remove huber_c"),
    ("objective.huber_schedule", "linear", "objective.huber_schedule: must be one of constant, exponential or snr, got 'linear'"),
    ("objective.huber_scale", 0, "objective.huber_scale: must be greater than 0, got 0"),
    ("output.name", "a/b", "output.name: must be a plain file name"),
    ("output.save_every_n_epochs", -1, "output.save_every_n_epochs: must be a positive integer, got -1"),
    ("sample.cfg_scale", 4, "sample.cfg_scale: unknown field 'cfg_scale'; it was renamed to sample.guidance_scale"),
    ("training.betas", [0.9, 0.99], "training.betas: unknown field 'betas'; it was renamed to training.adam_betas"),
    ("training.epsilon", 1e-6, "training.epsilon: unknown field 'epsilon'; it was renamed to training.adam_epsilon"),
    ("objective", {"min_timestep": 500, "max_timestep": 400}, "objective.max_timestep: must be greater than min_timestep (500), got 400"),
    ("objective.max_timestep", 1200, "objective.max_timestep: SDXL's noise schedule has 1000 timesteps, got 1200"),
    ("objective.min_timestep", 1000, "objective.min_timestep: SDXL's noise schedule has timesteps 0..999, got 1000"),
    ("objective.multires_noise_discount", 0.5, "objective.multires_noise_discount: applies only with multires_noise_iterations above 0"),
    ("objective.timestep_shift", 3.0, "objective.timestep_shift: applies only with timestep_distribution: shifted"),
    ("objective.logit_std", 2.0, "objective.logit_std: applies only with timestep_distribution: logit_normal"),
    ("objective.zero_terminal_snr", True, "objective.zero_terminal_snr: the last timestep becomes pure noise"),
    ("objective", {"min_snr_gamma": 5, "debiased_estimation": True}, "objective.debiased_estimation: min_snr_gamma and debiased"),
    ("objective.timestep_distribution", "beta", "objective.timestep_distribution: must be one of uniform, logit_normal or shifted"),
]


@pytest.mark.parametrize("field, value, expected", BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_bad_value_exits_2_with_a_one_line_error_naming_the_field(field, value, expected, raw_config, tmp_path, capsys):
    path = write_yaml(tmp_path / "bad.yaml", _with(raw_config, field, value))
    code, out, err = run_cli(["train", path], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing may be written for a bad config"


def test_all_parts_off_is_an_error(raw_config, tmp_path, capsys):
    raw_config["network"].update(train_unet=False, train_text_encoder_1=False, train_text_encoder_2=False)
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 2
    assert "network.train_unet: at least one of train_unet, train_text_encoder_1, train_text_encoder_2 must be true" in err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "the config must be a mapping of sections"),
        ("datasets: []\n", "model: is required"),
    ],
)
def test_malformed_files(text, expected, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, _, err = run_cli(["train", path], capsys)
    assert code == 2 and expected in err and "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(["train", tmp_path / "nope.yaml"], capsys)
    assert code == 2
    assert err.strip() == f"error: {tmp_path / 'nope.yaml'}: config file not found"


def test_every_error_is_reported_not_just_the_first(raw_config, tmp_path, capsys):
    raw_config["network"].update(rank=0, alpha=-1)
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 2
    assert "network.rank:" in err and "network.alpha:" in err


def test_bad_override_exits_2(raw_config, tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", raw_config)
    code, _, err = run_cli(["train", path, "--set", "datasets.3.repeats=5"], capsys)
    assert code == 2
    assert "datasets has 1 entry, so the index must be 0..0" in err or "datasets has 1 entries" in err
    code, _, err = run_cli(["train", path, "--set", "network.rank=-4"], capsys)
    assert code == 2 and "network.rank: must be a positive integer, got -4" in err


def test_override_reaches_the_config(raw_config, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", raw_config)
    config = load_config(path, ["datasets.0.repeats=5", "network.rank=16", "training.adam_betas=[0.8, 0.9]", "model.vae=null"])
    assert config.datasets[0].repeats == 5
    assert config.network.rank == 16
    assert config.training.adam_betas == (0.8, 0.9)


def test_a_real_process_prints_no_traceback(raw_config, tmp_path):
    raw_config["network"]["rank"] = -4
    path = write_yaml(tmp_path / "c.yaml", raw_config)
    result = subprocess.run(
        [sys.executable, "-m", "lora_trainer", "train", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: network.rank: must be a positive integer, got -4"
    assert result.stdout == ""
