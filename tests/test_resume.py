"""Training states and `--resume`: a stopped run continues bit for bit; a config that changes the math is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, small_raw_config, write_yaml
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.config.load import parse_config
from lora_trainer.errors import UserError
from lora_trainer.fit.state import saved_states


def resumable_raw(folder: Path) -> dict:
    """Every source of randomness on: buckets, tag shuffling, caption dropout, flips, adapter dropout, validation,
    and gradient accumulation, so a position or generator restored wrongly changes the numbers."""
    raw = small_raw_config(folder)
    raw["datasets"][0].update(shuffle_tags=True, caption_dropout=0.2, flip_aug=True)
    raw["data"].update(resolution=128, bucket_step=32)  # two buckets: 128 x 128 and 160 x 96
    raw["network"].update(dropout=0.1)
    raw["training"].update(max_steps=6, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=1)
    raw["validation"] = {"fraction": 0.2, "timesteps": [500]}
    raw["output"].update(save_state_every_n_steps=2, keep_states=5)
    return raw


def train_fresh(raw: dict, resume: str | None = None, overwrite: bool = False) -> Path:
    from accelerate.state import AcceleratorState, GradientState

    from lora_trainer.fit.train import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train(parse_config(raw), resume=resume, overwrite=overwrite)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def history(out: Path, name: str = "test_lora") -> dict:
    return json.loads((out / f"{name}-history.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    raw = resumable_raw(folder)
    path = train_fresh(raw)
    return path, history(path.parent)


def test_a_run_stopped_by_an_exception_resumes_bit_for_bit(uninterrupted, tmp_path, monkeypatch):
    import lora_trainer.fit.loop as loop

    raw = resumable_raw(tmp_path)
    real_report = loop._report

    def crash_at_step_5(run, bar, step, loss):  # reported at the next reading, before step 6's state is saved
        real_report(run, bar, step, loss)
        if step.step == 5:
            raise RuntimeError("power cut")

    monkeypatch.setattr(loop, "_report", crash_at_step_5)
    with pytest.raises(RuntimeError, match="power cut"):
        train_fresh(raw)
    monkeypatch.setattr(loop, "_report", real_report)
    output = parse_config(raw).output
    assert [path.name for path in saved_states(output)] == ["test_lora-step000002", "test_lora-step000004"]

    path = train_fresh(raw, resume="latest")
    reference_path, reference = uninterrupted
    resumed = history(path.parent)
    assert resumed["train_losses"] == reference["train_losses"]  # every logged loss, exactly
    assert [entry["validation_loss"] for entry in resumed["epochs"]] == [entry["validation_loss"] for entry in reference["epochs"]]
    expected, got = tensors(reference_path), tensors(path)
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def test_a_state_holds_the_adapters_and_optimizer_but_not_the_base(uninterrupted, tiny_model_path):
    path, _ = uninterrupted
    state = saved_states(parse_config(resumable_raw(path.parent.parent)).output)[-1]
    with safe_open(state / "adapters.safetensors", framework="pt") as handle:
        adapter_bytes = sum(handle.get_tensor(key).numel() * 4 for key in handle.keys())
        assert all(key.split("/")[0] in ("unet", "text_encoder_1", "text_encoder_2") and "lora_" in key for key in handle.keys())
    base_bytes = sum(file.stat().st_size for file in tiny_model_path.rglob("*.safetensors"))
    sizes = {file.name: file.stat().st_size for file in state.iterdir()}
    # AdamW keeps two moments per adapter weight (plus a step count each, and the names in the header); the
    # rest is counters, config and history.
    assert sizes["optimizer.safetensors"] == pytest.approx(2 * adapter_bytes, rel=0.1)
    assert sum(sizes.values()) < 3.3 * adapter_bytes + 100_000
    assert sum(sizes.values()) < base_bytes / 4
    assert json.loads((state / "state.json").read_text())["position"]["step"] == 6


def test_a_resume_that_changes_the_math_is_refused_naming_the_fields(uninterrupted, tmp_path, capsys):
    path, _ = uninterrupted
    raw = resumable_raw(path.parent.parent)
    raw["network"]["rank"] = 8
    raw["training"]["batch_size"] = 4
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw), "--resume", "latest"], capsys)
    assert code == 1 and err.count("error:") == 1 and "Traceback" not in err
    assert "network.rank (4 -> 8)" in err and "the global batch (training.batch_size x processes: 4 x 1 = 4; the state's is 2)" in err


def test_changing_the_step_budget_recomputes_the_schedule_and_says_so(uninterrupted, tmp_path, caplog):
    import shutil

    path, reference = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(path.parent.parent, copy)
    raw = resumable_raw(copy)
    raw["training"]["max_steps"] = 8
    raw["output"]["save_state_every_n_steps"] = 3  # the save cadence may change freely
    with caplog.at_level("INFO"):
        final = train_fresh(raw, resume="latest")
    assert "the run now has 8 steps instead of 6: the learning-rate schedule is recomputed over 8, so the rate at step 7" in caplog.text
    resumed = history(final.parent)
    assert resumed["train_losses"][:6] == reference["train_losses"] and len(resumed["train_losses"]) == 8
    # Step 7 trains at the new schedule's rate, not at the one the optimizer's saved state remembers.
    from conftest import tensorboard_scalars

    from lora_trainer.fit.schedules import learning_rate_at

    logged = dict(tensorboard_scalars(final.parent / "logs", "lr/unet"))
    expected = learning_rate_at(parse_config(raw).training, 8, 7)
    assert expected != pytest.approx(learning_rate_at(parse_config(resumable_raw(copy)).training, 6, 7))
    assert logged[7] == pytest.approx(expected, rel=1e-6)


def test_a_resume_on_changed_images_is_refused(tiny_model_path, tmp_path):
    import shutil

    from conftest import MIXED_SHAPES

    data = tmp_path / "data"
    shutil.copytree(MIXED_SHAPES, data)
    raw = small_raw_config(tmp_path)
    raw["datasets"][0]["path"] = str(data)
    raw["output"]["save_state_every_n_steps"] = 1
    train_fresh(raw)
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_text(caption.read_text().strip() + ", edited")
    with pytest.raises(UserError, match="the training images or captions changed since this state was saved"):
        train_fresh(raw, resume="latest")


def test_resume_latest_without_a_state_says_how_states_are_made(raw_config, tmp_path, capsys):
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config), "--resume", "latest"], capsys)
    assert code == 1 and "no saved state of run 'test_lora'" in err and "output.save_state_every_n_steps" in err


@pytest.mark.parametrize("failure", ["warn", "stop"])
def test_a_state_that_cannot_be_written_warns_and_trains_on_unless_asked_to_stop(raw_config, tmp_path, monkeypatch, caplog, failure):
    import errno

    import lora_trainer.fit.save as save
    from lora_trainer.files import write_failed

    def disk_full(folder, *_args, **_kwargs):
        raise write_failed(folder, OSError(errno.ENOSPC, "No space left on device"), needed=10_000_000)

    monkeypatch.setattr(save, "write_state", disk_full)
    raw_config["output"].update(save_state_every_n_steps=1, state_save_failure=failure)
    if failure == "stop":
        with pytest.raises(UserError, match="No space left on device"):
            train_fresh(raw_config)
        return
    with caplog.at_level("WARNING"):
        path = train_fresh(raw_config)
    assert path.is_file()
    warnings = [record.message for record in caplog.records if "was not saved, training goes on" in record.message]
    assert len(warnings) == 3 and "No space left on device (needed 10.0 MB" in warnings[0]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_optimizer_state_goes_through_safetensors_and_json_and_steps_on_identically(optimizer, tmp_path):
    """bitsandbytes keeps its 8-bit state in a nested dict of tensors; both kinds come back bit for bit."""
    from safetensors.torch import save

    from lora_trainer.fit import state

    def make(parameter):
        if optimizer == "adamw":
            return torch.optim.AdamW([parameter], lr=1e-3)
        bitsandbytes = pytest.importorskip("bitsandbytes")
        try:
            return bitsandbytes.optim.AdamW8bit([parameter], lr=1e-3)
        except Exception as error:  # no backend for this machine
            pytest.skip(f"bitsandbytes cannot run here: {error}")

    torch.manual_seed(0)
    first = torch.nn.Parameter(torch.randn(4096, 8))
    original = make(first)
    for scale in (1.0, -2.0, 0.5):
        first.grad = torch.full_like(first, scale)
        original.step()
    tensors, values = state._split_optimizer_state(original.state_dict())
    (tmp_path / "optimizer.safetensors").write_bytes(save(tensors))
    saved = state.SavedState(tmp_path, state.Position(3, 1, 0), 3, 1, 1, "", "", {"optimizer": json.loads(json.dumps(values))})
    second = torch.nn.Parameter(first.detach().clone())
    restored = make(second)
    state.load_optimizer_state(restored, saved)
    for parameter, optim in ((first, original), (second, restored)):
        parameter.grad = torch.full_like(parameter, 3.0)
        optim.step()
    assert torch.equal(first, second)


def test_a_state_saved_before_a_field_existed_resumes_when_the_field_keeps_its_default(tmp_path, tiny_model_path):
    from types import SimpleNamespace

    import yaml

    from lora_trainer.config.load import dump_config
    from lora_trainer.fit.resume_check import check_resumable

    config = parse_config(small_raw_config(tmp_path))
    older = yaml.safe_load(dump_config(config))
    del older["objective"], older["training"]["ema"]  # as an earlier version wrote the state's config
    saved = SimpleNamespace(config_text=yaml.safe_dump(older), global_batch_size=config.training.batch_size, folder=tmp_path)
    check_resumable(config, saved, num_processes=1)
    changed = parse_config({**small_raw_config(tmp_path), "objective": {"min_snr_gamma": 5}})
    with pytest.raises(UserError, match=r"objective\.min_snr_gamma \(unset -> 5\.0\)"):
        check_resumable(changed, saved, num_processes=1)
