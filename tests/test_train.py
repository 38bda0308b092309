"""The training command end to end on the tiny model: outputs, part switches, caching, failures."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import MIXED_SHAPES, run_cli, train_in_process, write_yaml

from lora_trainer.adapters.lora import lora_layers
from lora_trainer.config.load import parse_config
from lora_trainer.config.model import ModelConfig
from lora_trainer.errors import WriteFailed
from lora_trainer.export.lora_file import read_lora_file


def test_quickstart_runs_end_to_end_from_the_cli(quickstart_run):
    out, result = quickstart_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"saved {out / 'quickstart.safetensors'}"
    assert "Traceback" not in result.stderr
    assert "training" in result.stderr and "steps/s" in result.stderr  # the progress bar with its rate

    lora = read_lora_file(out / "quickstart.safetensors")
    assert {name.split("_")[1] for name in lora.weights} == {"unet", "te1", "te2"}
    assert (out / "quickstart-000002.safetensors").is_file()  # save_every_n_epochs: 2 of 4
    saved_config = parse_config(yaml.safe_load((out / "quickstart.yaml").read_text()))
    assert saved_config.training.mixed_precision == "no"  # resolved, never "auto"
    assert saved_config.output.dir == out
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard log missing"
    assert _tensorboard_scalars(out / "logs", "loss") == int(lora.metadata["ss_steps"])
    assert not list(out.rglob("*.tmp"))
    from PIL import Image

    with Image.open(out / "quickstart-loss.png") as curve:
        assert curve.size == (800, 400)
    # The before/after grid: the trigger prompt and two old prompts, before training and every 2 epochs.
    history = json.loads((out / "quickstart-history.json").read_text())
    assert sorted({entry["prompt"] for entry in history["samples"]}) == ["a blue triangle", "a red square", "a zqx circle"]
    assert sorted({entry["epoch"] for entry in history["samples"]}) == [0, 2, 4, 6, 8, 10]
    assert (out / "quickstart-report-grid.png").is_file() and (out / "quickstart-report.html").is_file()


def _tensorboard_scalars(folder, tag: str) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    count = 0
    for event_file in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            count += len(accumulator.Scalars(tag))
    return count


@pytest.mark.parametrize("part, prefix", [("unet", "lora_unet_"), ("text_encoder_1", "lora_te1_"), ("text_encoder_2", "lora_te2_")])
def test_with_one_part_switched_on_only_its_adapters_train(part, prefix, raw_config):
    raw_config["network"].update(train_unet=False, train_text_encoder_1=False, train_text_encoder_2=False)
    raw_config["network"][f"train_{part}"] = True
    raw_config["training"].update(max_steps=3, learning_rate=1e-2)
    run, path = train_in_process(raw_config)

    assert list(run.trained) == [part]
    lora = read_lora_file(path)
    assert lora.weights and all(name.startswith(prefix) for name in lora.weights)
    moved = {name for name, weights in lora.weights.items() if weights.up.abs().max() > 0}
    if part == "text_encoder_1":
        # SDXL reads CLIP-L's penultimate layer, so the last layer's adapters (written, as kohya does) get no gradient.
        last = run.accelerator.unwrap_model(run.trained[part]).config.num_hidden_layers - 1
        unused = {name for name in lora.weights if f"_encoder_layers_{last}_" in name}
        assert len(unused) == 6 and moved == set(lora.weights) - unused
        frozen = [name for name, layer in lora_layers(run.accelerator.unwrap_model(run.trained[part])).items() if not layer.lora_A["default"].weight.requires_grad]
        assert len(frozen) == 6 and all(f"layers.{last}." in name for name in frozen)  # so DDP never waits for them
    else:
        assert moved == set(lora.weights), "every adapter moved from its zero start"
    # Base weights never change: compare every non-adapter tensor with a fresh load.
    from lora_trainer.model.parts import load_sdxl

    fresh = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).lora_targets()
    trained = run.accelerator.unwrap_model(run.trained[part])
    for name, tensor in trained.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(tensor, fresh[part].state_dict()[name.replace(".base_layer", "")], rtol=0, atol=0)
    assert len(lora_layers(trained)) == len(lora.weights)


def test_frozen_text_encoders_are_encoded_once_not_every_step(raw_config, monkeypatch):
    import lora_trainer.model.conditioning as conditioning

    calls = []
    real = conditioning.encode_token_ids
    monkeypatch.setattr(conditioning, "encode_token_ids", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    raw_config["network"].update(train_text_encoder_1=False, train_text_encoder_2=False)
    raw_config["training"]["max_steps"] = 6
    train_in_process(raw_config)
    assert sum(calls) == 12  # each of the 12 distinct captions once, none per step


def test_gradient_accumulation_counts_optimizer_steps(raw_config):
    raw_config["training"].update(max_steps=None, epochs=1, batch_size=2, gradient_accumulation_steps=2)
    run, path = train_in_process(raw_config)
    # 12 images / batch 2 = 6 batches; 2 batches per optimizer step = 3 steps.
    assert run.step == run.total_steps == 3
    assert read_lora_file(path).metadata["ss_steps"] == "3"


def test_cache_latents_fills_the_cache_and_train_reuses_it(raw_config, tmp_path, capsys, monkeypatch):
    path = write_yaml(tmp_path / "c.yaml", raw_config)
    code, out, err = run_cli(["cache-latents", path], capsys)
    assert code == 0, err
    cache_files = sorted((tmp_path / "cache" / "latents").glob("*/*.safetensors"))
    assert len(cache_files) == 12
    assert "latents: 0 reused, 12 encoded" in out and f"cache: {tmp_path / 'cache'}" in out

    import lora_trainer.cache.latents as cache_module

    def no_encoding(*_args, **_kwargs):
        raise AssertionError("an image was encoded although every latent was cached")

    monkeypatch.setattr(cache_module, "_encode_batch", no_encoding)
    code, out, err = run_cli(["train", path], capsys)
    assert code == 0, err
    assert sorted((tmp_path / "cache" / "latents").glob("*/*.safetensors")) == cache_files


def test_an_exception_mid_epoch_leaves_no_half_written_file(raw_config, tmp_path, monkeypatch):
    import lora_trainer.fit.loop as train_module

    raw_config["training"].update(max_steps=None, epochs=3)
    raw_config["output"]["save_every_n_epochs"] = 1
    real_step, calls = train_module.training_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in the middle of epoch 2 (6 batches per epoch)
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_in_process(raw_config)
    out = tmp_path / "out"
    assert sorted(path.name for path in out.glob("*.safetensors")) == ["test_lora-000001.safetensors"]
    assert read_lora_file(out / "test_lora-000001.safetensors").metadata["ss_epoch"] == "1"
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


def test_a_crash_while_saving_keeps_the_previous_file_whole(raw_config, tmp_path, monkeypatch):
    import lora_trainer.files as files

    run, path = train_in_process(raw_config)
    before = path.read_bytes()

    def crash(_descriptor):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", crash)
    raw_config["training"]["max_steps"] = 4
    with pytest.raises(WriteFailed, match="disk full; the previous .* is unchanged"):
        train_in_process(raw_config)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_non_finite_loss_stops_with_a_message_and_saves_the_last_good_step(raw_config, tmp_path, capsys, monkeypatch):
    import lora_trainer.fit.loop as train_module

    raw_config["training"]["max_steps"] = 10
    real_step, calls = train_module.training_step, []

    def exploding_step(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(train_module, "training_step", exploding_step)
    code, out, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 1
    saved = tmp_path / "out" / "test_lora-step000003.safetensors"
    lines = err.strip().splitlines()
    assert lines[-1] == (
        f"error: training stopped: loss became nan at step 4 (epoch 1); saved the LoRA of step 3, the last good one, "
        f"to {saved}; lower training.learning_rate, or use training.mixed_precision bf16 instead of fp16"
    )
    assert "Traceback" not in err
    assert read_lora_file(saved).metadata["ss_steps"] == "3"
    assert not (tmp_path / "out" / "test_lora.safetensors").exists()


def test_a_bad_image_stops_the_run_before_training_when_asked(raw_config, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(MIXED_SHAPES, data)
    (data / "broken.png").write_bytes(b"not a png")
    raw_config["datasets"][0]["path"] = str(data)
    raw_config["data"]["on_bad_image"] = "error"
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-2].startswith(f"error: {data / 'broken.png'}: cannot read this image")
    assert lines[-1] == "error: 1 bad data files; fix or remove them, or set data.on_bad_image: skip to train without them"
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_an_empty_folder_is_a_config_error(raw_config, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    raw_config["datasets"][0]["path"] = str(tmp_path / "empty")
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 2
    assert err.strip() == (
        f"error: datasets.0.path: no images (png, jpg, jpeg, webp, bmp, gif) in {tmp_path / 'empty'}, "
        "nor in kohya-style subfolders like 10_name"
    )


def test_a_missing_tensorboard_is_an_error_not_a_silent_run(raw_config, tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 1
    assert err.strip() == "error: TensorBoard is not installed, so no training curves would be logged; pip install tensorboard"


def test_running_out_of_gpu_memory_gives_advice(raw_config, tmp_path, capsys, monkeypatch):
    import lora_trainer.fit.loop as train_module

    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "training_step", out_of_memory)
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: out of GPU memory at step 1") and "training.gradient_checkpointing" in line
    assert "Traceback" not in err


def test_an_unreachable_hub_model_names_the_field(raw_config, tmp_path, capsys):
    raw_config["model"]["pretrained"] = "nobody-here/no-such-sdxl"  # HF_HUB_OFFLINE=1 in the tests
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: model.pretrained: cannot load the noise scheduler of 'nobody-here/no-such-sdxl'")
    assert "Traceback" not in err
