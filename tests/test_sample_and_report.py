"""`lora-train sample`, samples and validation loss during training, and the run report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from a1111_infotext import read_generation_info
from conftest import copy_examples, run_cli, small_raw_config, train_in_process, write_yaml
from PIL import Image

SMALL = ["--steps", "2", "--width", "64", "--height", "64", "--model", "builtin:tiny-sdxl"]


@pytest.fixture
def lora_file(small_lora_file):
    return small_lora_file


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def sample(capsys, out, *args) -> list[str]:
    code, stdout, err = run_cli(["sample", *SMALL, "--out", out, *args], capsys)
    assert code == 0, err
    return [line for line in stdout.splitlines() if line]


def test_the_same_seed_draws_the_same_image_and_weight_zero_is_the_base(lora_file, tmp_path, capsys):
    prompt = ["--prompt", "lts_shapes, a red circle", "--seed", "3"]
    base = sample(capsys, tmp_path / "base", *prompt)
    again = sample(capsys, tmp_path / "again", *prompt)
    zero = sample(capsys, tmp_path / "zero", *prompt, "--lora", f"{lora_file}:0")
    full = sample(capsys, tmp_path / "full", *prompt, "--lora", str(lora_file))
    assert [p.rsplit("/", 1)[-1] for p in base] == ["00-lts-shapes-a-red-circle-seed3.png"]
    assert np.array_equal(pixels(base[0]), pixels(again[0]))
    assert np.array_equal(pixels(base[0]), pixels(zero[0]))
    assert np.abs(pixels(base[0]) - pixels(full[0])).mean() > 1  # the LoRA changes the picture


def test_loras_stack_with_their_weights(lora_file, tmp_path, capsys):
    prompt = ["--prompt", "a blue square"]
    whole = sample(capsys, tmp_path / "whole", *prompt, "--lora", str(lora_file))
    halves = sample(capsys, tmp_path / "halves", *prompt, "--lora", f"{lora_file}:0.5", "--lora", f"{lora_file}:0.5")
    assert np.abs(pixels(whole[0]) - pixels(halves[0])).max() <= 2  # W + 0.5 d + 0.5 d = W + d, up to rounding


def test_png_parameters_round_trip(lora_file, tmp_path, capsys):
    [path] = sample(capsys, tmp_path, "--prompt", "a red circle, flat --n blurry --d 11 --l 4.5 --ss dpm++_2m_karras",
                    "--lora", f"{lora_file}:0.75")
    info = read_generation_info(path)
    assert (info.prompt, info.negative_prompt, info.seed, info.guidance_scale) == ("a red circle, flat", "blurry", 11, 4.5)
    assert (info.sampler, info.steps, info.width, info.height) == ("dpm++_2m_karras", 2, 64, 64)
    assert info.loras == ((lora_file.stem, 0.75),) and info.model == "builtin:tiny-sdxl"
    with Image.open(path) as image:
        assert "<lora:test_lora:0.75>" in image.text["parameters"]


def test_prompts_file_options_and_every_sampler(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# one line per prompt\n\n"
        "a red circle --w 96 --h 64 --d 5\n"
        'a "quoted" square --n "text, -- watermark" --ss euler_a\n'
        "a green triangle --ss dpm++_2m --s 3\n"
        "a yellow circle --ss ddim\n"
        "a blue triangle --ss DPM++ 2M Karras\n",
        encoding="utf-8",
    )
    paths = sample(capsys, tmp_path / "out", "--prompts-file", prompts, "--images", "2")
    assert len(paths) == 10
    assert paths[0].endswith("00-a-red-circle-seed5.png") and paths[1].endswith("00-a-red-circle-seed6.png")
    with Image.open(paths[0]) as image:
        assert image.size == (96, 64)
    assert [read_generation_info(path).sampler for path in paths[::2]] == ["euler", "euler_a", "dpm++_2m", "ddim", "dpm++_2m_karras"]
    assert read_generation_info(paths[2]).negative_prompt == "text, -- watermark"


def test_a_bad_prompts_file_names_the_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square --q 3\n", encoding="utf-8")
    code, _, err = run_cli(["sample", *SMALL, "--prompts-file", prompts], capsys)
    assert code == 2 and err.startswith(f"error: --prompts-file: {prompts}:3: unknown option --q")


def test_compare_draws_with_and_without_the_lora_side_by_side(lora_file, tmp_path, capsys):
    paths = sample(capsys, tmp_path, "--prompt", "a red circle", "--lora", str(lora_file), "--compare")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00-a-red-circle-seed0.png", "00-a-red-circle-seed0-compare.png"]
    base = sample(capsys, tmp_path / "plain", "--prompt", "a red circle")
    assert np.array_equal(pixels(tmp_path / "00-a-red-circle-seed0-base.png"), pixels(base[0]))
    with Image.open(paths[1]) as side_by_side:
        assert side_by_side.width == 128


def test_sample_option_errors(tmp_path, capsys):
    code, _, err = run_cli(["sample", *SMALL, "--prompt", "a", "--sampler", "plms"], capsys)
    assert code == 2 and "--sampler: unknown sampler 'plms'" in err
    code, _, err = run_cli(["sample", *SMALL], capsys)
    assert code == 2 and "--prompt: give at least one --prompt or a --prompts-file" in err
    code, _, err = run_cli(["sample", *SMALL, "--prompt", "a", "--steps", "0"], capsys)
    assert code == 2 and err.strip() == "error: --steps: must be a positive integer, got '0'"
    code, _, err = run_cli(["sample", *SMALL, "--prompt", "a", "--cfg", "4"], capsys)
    assert code == 2 and err.strip() == "error: --cfg: renamed to --guidance-scale; give --guidance-scale instead"


def small_lora_config(small_lora_file, tmp_path, **sample) -> Path:
    """The config that trained the session's small LoRA, with a sample section, as a YAML file."""
    folder = small_lora_file.parent.parent
    raw = small_raw_config(folder)
    raw["training"].update(max_steps=4, learning_rate=5e-2)
    raw["sample"] = {"prompts": ["a red circle --d 4"], "steps": 2, **sample}
    return write_yaml(tmp_path / "trained.yaml", raw)


def test_sample_with_the_config_draws_its_prompts_with_the_lora_it_trained(small_lora_file, tmp_path, capsys):
    config = small_lora_config(small_lora_file, tmp_path)
    code, out, err = run_cli(["sample", "--config", config, "--compare", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    paths = [line for line in out.splitlines() if line]
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00-a-red-circle-seed4.png", "00-a-red-circle-seed4-compare.png"]
    with_lora, without = pixels(paths[0]), pixels(tmp_path / "out" / "00-a-red-circle-seed4-base.png")
    assert with_lora.shape == (64, 64, 3)  # the config's training resolution
    assert np.abs(with_lora - without).mean() > 1  # two different images: the config's LoRA is on
    assert read_generation_info(paths[0]).loras == ((small_lora_file.stem, 1.0),)
    assert read_generation_info(tmp_path / "out" / "00-a-red-circle-seed4-base.png").loras == ()


def test_sample_options_override_the_config(small_lora_file, tmp_path, capsys):
    config = small_lora_config(small_lora_file, tmp_path)
    code, out, err = run_cli(["sample", "--config", config, "--prompt", "a blue square", "--steps", "1", "--width", "96",
                              "--lora", f"{small_lora_file}:0.5", "--out", tmp_path], capsys)
    assert code == 0, err
    [path] = [line for line in out.splitlines() if line]
    info = read_generation_info(path)
    assert (info.prompt, info.steps, info.width, info.height, info.loras) == ("a blue square", 1, 96, 64, ((small_lora_file.stem, 0.5),))
    code, _, err = run_cli(["sample", "--config", config, "--model", "builtin:tiny-sdxl"], capsys)
    assert code == 2 and err.strip() == "error: --model: give either --model or --config, not both"


def test_sample_with_a_config_that_has_not_trained_yet_says_so(tmp_path, capsys):
    raw = small_raw_config(tmp_path)
    raw["sample"] = {"prompts": ["a red circle"]}
    config = write_yaml(tmp_path / "fresh.yaml", raw)
    code, _, err = run_cli(["sample", "--config", config], capsys)
    lora = tmp_path / "out" / "test_lora.safetensors"
    assert code == 2 and err.strip() == f"error: --config: {config} trains {lora}, which is not there yet; train it first or give --lora"


def training_config(tmp_path, **sample) -> dict:
    raw = small_raw_config(tmp_path)
    raw["training"].update(max_steps=None, epochs=2)
    raw["output"]["save_every_n_epochs"] = 1
    raw["sample"] = {"prompts": ["lts_shapes, a red circle", "a blue square --d 9"], "steps": 2, **sample}
    raw["validation"] = {"fraction": 0.25, "timesteps": [200, 800]}
    return raw


def test_training_samples_every_epoch_and_writes_the_report(tiny_model_path, tmp_path):
    run, path = train_in_process(training_config(tmp_path))
    out = tmp_path / "out"
    history = json.loads((out / "test_lora-history.json").read_text())
    samples = [(entry["epoch"], entry["prompt_index"]) for entry in history["samples"]]
    assert samples == [(epoch, index) for epoch in (0, 1, 2) for index in (0, 1)]
    for entry in history["samples"]:
        with Image.open(out / entry["image"]) as image:
            assert image.size == (64, 64)  # the training resolution by default
    assert [entry["seed"] for entry in history["samples"][:2]] == [0, 9]
    assert [(entry["epoch"], entry["lora_file"]) for entry in history["epochs"]] == [
        (0, None), (1, "test_lora-000001.safetensors"), (2, "test_lora.safetensors"),
    ]
    assert all(entry["validation_loss"] > 0 for entry in history["epochs"])
    for suffix in ("report.html", "report-loss.png", "report-grid.png"):
        assert (out / f"test_lora-{suffix}").is_file()
    html = (out / "test_lora-report.html").read_text()
    assert "test_lora-000001.safetensors" in html and "a blue square" in html
    events = b"".join(path.read_bytes() for path in (out / "logs").rglob("events.out.tfevents.*"))
    assert b"samples/00" in events and b"samples/01" in events and b"loss/validation" in events


def test_validation_loss_is_the_same_when_recomputed_from_the_saved_files(tiny_model_path, tmp_path):
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.export.load import load_loras_into
    from lora_trainer.export.lora_file import read_lora_file
    from lora_trainer.fit.validation import validation_loss
    from lora_trainer.model.conditioning import live_caption_encoder
    from lora_trainer.model.parts import load_sdxl

    raw = training_config(tmp_path)
    raw.pop("sample")
    run, _ = train_in_process(raw)
    validation = run.evaluator.validation
    assert len(validation.items) == 3 and len(run.dataloader.dataset) == 9  # 12 images, a quarter held out
    history = json.loads((tmp_path / "out" / "test_lora-history.json").read_text())
    settings = run.config.validation
    for entry in history["epochs"]:
        parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
        unet, text = parts.unet, parts.text
        if entry["lora_file"]:
            path = tmp_path / "out" / entry["lora_file"]
            load_loras_into(parts.lora_targets(), [(read_lora_file(path), 1.0, str(path))])
        for part in (unet, text.text_encoder_1, text.text_encoder_2):
            part.eval()
        encode = live_caption_encoder(text.tokenizer_1, text.tokenizer_2, text.text_encoder_1, text.text_encoder_2, torch.device("cpu"))
        again = validation_loss(unet, encode, run.noise_scheduler, validation, settings.timesteps, settings.seed, torch.device("cpu"))
        assert again == pytest.approx(entry["validation_loss"], rel=1e-5), entry
    losses = [entry["validation_loss"] for entry in history["epochs"]]
    assert len(set(losses)) == 3  # the LoRA changed between evaluations


def test_a_sampling_round_hands_the_models_back_as_it_found_them(tiny_model_path, tmp_path):
    from lora_trainer.config.load import parse_config
    from lora_trainer.fit.setup import setup

    raw = training_config(tmp_path)
    raw["training"]["mixed_precision"] = "bf16"  # half-precision base weights beside fp32 adapters
    raw["network"]["train_text_encoder_2"] = False
    run = setup(parse_config(raw))
    try:
        text = run.parts.text
        models = {"unet": run.unet, "text_encoder_1": text.text_encoder_1, "text_encoder_2": text.text_encoder_2}
        for model in run.trained.values():
            model.train()  # as fit() leaves them between steps
        before = {name: ([p.dtype for p in model.parameters()], model.training) for name, model in models.items()}
        assert before["unet"][1] and not before["text_encoder_2"][1]
        drawer = run.evaluator.drawer
        paths = drawer.draw_round(1, 0, None)
        assert len(paths) == 2 and all(path.is_file() for path in paths)
        after = {name: ([p.dtype for p in model.parameters()], model.training) for name, model in models.items()}
        assert after == before
        assert {torch.bfloat16, torch.float32} <= set(after["unet"][0])
        assert drawer.vae.device.type == "cpu"
    finally:
        run.accelerator.end_training()


def test_report_command_rebuilds_the_report(tiny_model_path, tmp_path, capsys):
    raw = training_config(tmp_path)
    raw["training"]["epochs"] = 1
    train_in_process(raw)
    report = tmp_path / "out" / "test_lora-report.html"
    report.unlink()
    code, out, err = run_cli(["report", tmp_path / "out"], capsys)
    assert code == 0, err
    assert out.strip() == str(report) and report.is_file()
    code, _, err = run_cli(["report", tmp_path], capsys)
    assert code == 1 and err.strip() == f"error: {tmp_path}: no run history (*-history.json) here; give the output.dir of a training run"


def test_a_bad_sample_prompt_in_the_config_names_it(raw_config, tmp_path, capsys):
    raw_config["sample"] = {"prompts": ["a red circle --w 65"]}
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 2
    assert err.strip().startswith(f"error: {tmp_path / 'c.yaml'}: sample.prompts: prompt 1: ")
    assert "--w 65: width and height must be positive multiples of 8" in err


def test_validation_on_a_separate_folder_keeps_every_training_image(tiny_model_path, tmp_path):
    held_out = tmp_path / "held_out"
    copy_examples(held_out, 2)
    raw = training_config(tmp_path)
    raw.pop("sample")
    raw["training"]["epochs"] = 1
    raw["validation"] = {"path": str(held_out)}
    run, _ = train_in_process(raw)
    assert len(run.dataloader.dataset) == 12 and len(run.evaluator.validation.items) == 2
    assert run.evaluator.validation.captions[0] == (held_out / "00_red_circle.txt").read_text().strip()
    history = json.loads((tmp_path / "out" / "test_lora-history.json").read_text())
    assert [entry["epoch"] for entry in history["epochs"] if entry["validation_loss"]] == [0, 1]
