"""Prompt files with kohya's inline options, sampler names and schedulers, and A1111 parameters in PNGs."""

from __future__ import annotations

from pathlib import Path

import pytest
from a1111_infotext import parse_parameters, read_generation_info, sampler_from_a1111
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image

from lora_trainer import __version__
from lora_trainer.config.prompts import PromptSpec, parse_prompt_line, read_prompts_file
from lora_trainer.config.samplers import SAMPLER_NAMES, canonical_sampler
from lora_trainer.errors import ConfigError
from lora_trainer.sampling.png_info import GenerationInfo, parameters_text, png_bytes, save_png
from lora_trainer.sampling.schedulers import a1111_label, make_scheduler

# SDXL base 1.0's scheduler config, written out so no model is needed.
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}


# ---- prompt lines -------------------------------------------------------------------------------------


def test_every_inline_option_is_read_into_its_field():
    spec = parse_prompt_line(
        "a cat on a sofa, 4k --n blurry, lowres --w 832 --h 1216 --d 42 --l 5.5 --s 28 --ss DPM++ 2M Karras",
        "prompts.txt:1",
    )
    assert spec == PromptSpec(
        prompt="a cat on a sofa, 4k",
        negative_prompt="blurry, lowres",
        width=832,
        height=1216,
        seed=42,
        guidance_scale=5.5,
        steps=28,
        sampler="dpm++_2m_karras",
    )


def test_a_line_without_options_is_only_a_prompt():
    assert parse_prompt_line("  a red fox in snow  ", "p:1") == PromptSpec("a red fox in snow")


def test_options_may_come_in_any_order_and_any_case():
    spec = parse_prompt_line("a fox --SS k_euler_a --D 7 --W 1024", "p:1")
    assert (spec.sampler, spec.seed, spec.width) == ("euler_a", 7, 1024)


@pytest.mark.parametrize(
    "line, expected",
    [
        # ` --` inside quotes is text, in the negative prompt and in the prompt.
        ('a cat --n "photo -- blurry" --s 20', PromptSpec("a cat", negative_prompt="photo -- blurry", steps=20)),
        ('"a cat --w 8" --w 512', PromptSpec("a cat --w 8", width=512)),
        # Quotes that do not wrap the whole value are prompt text and stay.
        ('a "big --fluffy" cat', PromptSpec('a "big --fluffy" cat')),
        # Empty quotes: explicitly no negative prompt, overriding any default.
        ('a cat --n ""', PromptSpec("a cat", negative_prompt="")),
        # Spaces inside quotes are kept; outside they are trimmed.
        ('a cat --n " soft "  ', PromptSpec("a cat", negative_prompt=" soft ")),
        # `--` inside a word is not an option.
        ("a well--lit room", PromptSpec("a well--lit room")),
    ],
)
def test_quoting(line, expected):
    assert parse_prompt_line(line, "p:1") == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("a cat --x 3", "p:7: unknown option --x; known options: --n --w --h --d --l --s --ss"),
        ("a cat -- not an option", "p:7: '--' without an option name"),
        ("a cat --w", "p:7: --w has no value"),
        ("a cat --n --w 512", "p:7: --n has no value"),
        ("a cat --w 1020", "p:7: --w 1020: width and height must be positive multiples of 8"),
        ("a cat --h 0", "p:7: --h 0: width and height must be positive multiples of 8"),
        ("a cat --h -64", "p:7: --h -64: width and height must be positive multiples of 8"),
        ("a cat --w 512.0", "p:7: --w 512.0: width and height must be positive multiples of 8"),
        ("a cat --s 0", "p:7: --s 0: steps must be a whole number of at least 1"),
        ("a cat --l -1", "p:7: --l -1: the guidance scale must not be negative"),
        ("a cat --l seven", "p:7: --l seven: the guidance scale must be a number"),
        ("a cat --l inf", "p:7: --l inf: the guidance scale must be a number"),
        ("a cat --d 1.5", "p:7: --d 1.5: the seed must be a whole number"),
        ("a cat --d -1", "p:7: --d -1: the seed must be a whole number"),
        ("a cat --d 18446744073709551616", "p:7: --d 18446744073709551616: the seed must be a whole number from 0"),
        ("a cat --ss foo", "p:7: --ss foo: unknown sampler 'foo'; choose euler, euler_a, dpm++_2m, dpm++_2m_karras or ddim"),
        ('a cat --n "blurry', 'p:7: a double quote (") is not closed'),
        ("a cat --w 512 --w 768", "p:7: --w is given twice; keep one"),
        ("--w 512 --h 512", "p:7: the prompt is empty"),
        ('"" --w 512', "p:7: the prompt is empty"),
    ],
)
def test_bad_lines_say_where_and_what_is_wrong(line, message):
    with pytest.raises(ConfigError) as raised:
        parse_prompt_line(line, "p:7")
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_the_largest_seed_torch_accepts_is_allowed():
    assert parse_prompt_line("a cat --d 18446744073709551615", "p:1").seed == 2**64 - 1


def test_defaults_fill_only_the_fields_a_prompt_left_unset():
    defaults = PromptSpec("ignored", negative_prompt="lowres", width=1024, height=1024, seed=0, guidance_scale=7.0, steps=30, sampler="euler")
    spec = PromptSpec("a cat", negative_prompt="", width=832, sampler="ddim")
    assert spec.filled(defaults) == PromptSpec(
        "a cat", negative_prompt="", width=832, height=1024, seed=0, guidance_scale=7.0, steps=30, sampler="ddim"
    )


# ---- prompt files -------------------------------------------------------------------------------------


def test_a_prompts_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# sample prompts\n\na cat --d 1\n   \n  # indented comment\na dog # not a comment --s 10\r\n", encoding="utf-8")
    assert read_prompts_file(path) == [PromptSpec("a cat", seed=1), PromptSpec("a dog # not a comment", steps=10)]


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa cat\n".encode())
    assert read_prompts_file(path) == [PromptSpec("a cat")]


def test_errors_in_a_prompts_file_name_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n\na cat\na dog --x 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^.*prompts\.txt:4: unknown option --x; known options: --n --w --h --d --l --s --ss$") as raised:
        read_prompts_file(path)
    assert str(raised.value).startswith(f"{path}:4: ")


def test_a_missing_prompts_file_is_a_config_error(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(ConfigError) as raised:
        read_prompts_file(path)
    assert str(raised.value) == f"{path}: prompts file not found"


def test_a_prompts_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\ncaf\xe9 au lait\n")
    with pytest.raises(ConfigError) as raised:
        read_prompts_file(path)
    assert str(raised.value).startswith(f"{path}:2: ")
    assert "UTF-8" in str(raised.value)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n   \n"])
def test_a_prompts_file_without_prompts_is_a_config_error(tmp_path, content):
    path = tmp_path / "prompts.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match="has no prompts") as raised:
        read_prompts_file(path)
    assert str(raised.value).startswith(f"{path}: ")


# ---- samplers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias, canonical",
    [
        *[(name, name) for name in SAMPLER_NAMES],
        # A1111 labels
        ("Euler", "euler"),
        ("Euler a", "euler_a"),
        ("DPM++ 2M", "dpm++_2m"),
        ("DPM++ 2M Karras", "dpm++_2m_karras"),
        ("DDIM", "ddim"),
        # kohya sd-scripts, A1111's internal aliases, ComfyUI
        ("k_euler", "euler"),
        ("k_euler_a", "euler_a"),
        ("dpmsolver++", "dpm++_2m"),
        ("k_dpmpp_2m", "dpm++_2m"),
        ("k_dpmpp_2m_ka", "dpm++_2m_karras"),
        ("euler_ancestral", "euler_a"),
        ("dpmpp_2m", "dpm++_2m"),
        # case, spaces, '-' and '_' are all the same
        ("  EULER-A ", "euler_a"),
        ("dpm++ 2m_KARRAS", "dpm++_2m_karras"),
    ],
)
def test_sampler_aliases(alias, canonical):
    assert canonical_sampler(alias) == canonical


@pytest.mark.parametrize("name", ["foo", "", "euler_b", "dpm++_3m", "lms"])
def test_unknown_samplers_list_the_choices(name):
    with pytest.raises(ValueError) as raised:
        canonical_sampler(name)
    assert str(raised.value) == f"unknown sampler {name!r}; choose euler, euler_a, dpm++_2m, dpm++_2m_karras or ddim"


@pytest.mark.parametrize(
    "name, scheduler_class, karras",
    [
        ("euler", EulerDiscreteScheduler, False),
        ("euler_a", EulerAncestralDiscreteScheduler, None),
        ("dpm++_2m", DPMSolverMultistepScheduler, False),
        ("dpm++_2m_karras", DPMSolverMultistepScheduler, True),
        ("ddim", DDIMScheduler, None),
    ],
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_make_scheduler_builds_the_sampler_with_the_models_betas(name, scheduler_class, karras, prediction_type):
    scheduler = make_scheduler(name, SDXL_SCHEDULER_CONFIG, prediction_type)
    assert type(scheduler) is scheduler_class
    assert scheduler.config.prediction_type == prediction_type
    assert (scheduler.config.beta_end, scheduler.config.beta_schedule, scheduler.config.timestep_spacing) == (0.012, "scaled_linear", "leading")
    if karras is not None:
        assert scheduler.config.use_karras_sigmas is karras
    if scheduler_class is DPMSolverMultistepScheduler:
        assert (scheduler.config.algorithm_type, scheduler.config.solver_order) == ("dpmsolver++", 2)


def test_karras_sigmas_actually_change_the_dpm_schedule():
    plain = make_scheduler("dpm++_2m", SDXL_SCHEDULER_CONFIG, "epsilon")
    karras = make_scheduler("dpm++_2m_karras", SDXL_SCHEDULER_CONFIG, "epsilon")
    plain.set_timesteps(20)
    karras.set_timesteps(20)
    assert plain.timesteps.tolist() != karras.timesteps.tolist()


def test_euler_is_plain_even_from_a_karras_config():
    scheduler = make_scheduler("euler", {**SDXL_SCHEDULER_CONFIG, "use_karras_sigmas": True}, "epsilon")
    assert scheduler.config.use_karras_sigmas is False


def test_ddim_does_not_clip_latents_when_the_config_is_silent():
    config = {key: value for key, value in SDXL_SCHEDULER_CONFIG.items() if key != "clip_sample"}
    assert make_scheduler("ddim", config, "epsilon").config.clip_sample is False


def test_make_scheduler_rejects_an_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'foo'"):
        make_scheduler("foo", SDXL_SCHEDULER_CONFIG, "epsilon")


@pytest.mark.parametrize(
    "name, label",
    [
        ("euler", ("Euler", None)),
        ("euler_a", ("Euler a", None)),
        # A1111 1.9+ reads a bare "DPM++ 2M" as Karras, so the plain one says Uniform.
        ("dpm++_2m", ("DPM++ 2M", "Uniform")),
        ("dpm++_2m_karras", ("DPM++ 2M", "Karras")),
        ("ddim", ("DDIM", None)),
    ],
)
def test_a1111_labels_and_back(name, label):
    assert a1111_label(name) == label
    assert sampler_from_a1111(*label) == name


@pytest.mark.parametrize(
    "label, schedule_type, canonical",
    [
        ("DPM++ 2M Karras", None, "dpm++_2m_karras"),  # A1111 before 1.9
        ("DPM++ 2M", "Automatic", "dpm++_2m"),
        ("Euler a", "Automatic", "euler_a"),
        ("Euler", "Uniform", "euler"),
    ],
)
def test_older_and_default_a1111_labels_are_read(label, schedule_type, canonical):
    assert sampler_from_a1111(label, schedule_type) == canonical


def test_a_schedule_we_cannot_run_is_refused():
    with pytest.raises(ValueError, match="schedule type 'Karras'"):
        sampler_from_a1111("Euler a", "Karras")


# ---- A1111 parameters in PNGs -------------------------------------------------------------------------

EXAMPLE = GenerationInfo(
    prompt="a photo of sks dog, sitting",
    negative_prompt="blurry, lowres",
    steps=30,
    sampler="dpm++_2m_karras",
    guidance_scale=7.0,
    seed=42,
    width=1024,
    height=1024,
    model="sd_xl_base_1.0",
    loras=(("my_dog", 0.8), ("detail", -0.5)),
)


def test_parameters_text_has_a1111s_layout():
    assert parameters_text(EXAMPLE) == (
        "a photo of sks dog, sitting <lora:my_dog:0.8> <lora:detail:-0.5>\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 1024x1024, "
        f"Model: sd_xl_base_1.0, Version: lora-train {__version__}"
    )


def test_without_negative_prompt_loras_or_schedule_type_those_parts_are_left_out():
    info = GenerationInfo("a cat", "", 20, "euler_a", 4.5, 7, 832, 1216, "model")
    assert parameters_text(info) == (
        f"a cat\nSteps: 20, Sampler: Euler a, CFG scale: 4.5, Seed: 7, Size: 832x1216, Model: model, Version: lora-train {__version__}"
    )


def test_values_with_commas_or_colons_are_quoted_as_a1111_does():
    info = GenerationInfo("a cat", "", 20, "ddim", 7.0, 1, 1024, 1024, 'C:\\models\\sdxl, "v2"')
    assert ', Model: "C:\\\\models\\\\sdxl, \\"v2\\"", Version: ' in parameters_text(info)


@pytest.mark.parametrize(
    "info",
    [
        EXAMPLE,
        GenerationInfo("a cat", "", 1, "euler", 0.0, 0, 8, 8, ""),
        GenerationInfo(
            'portrait, "quoted", (masterpiece:1.2), a: b, c -- d',
            'text, watermark: no, "bad hands"',
            50,
            "dpm++_2m",
            12.25,
            2**64 - 1,
            896,
            1152,
            "models/sdxl: v1.0, final",
            (("style a", 1.0), ("b", 0.125), ("c", -1.5), ("d", 1e-05)),
        ),
        # No prompt text, only LoRAs; non-Latin-1 text goes into an iTXt chunk.
        GenerationInfo("", "ぼやけた", 25, "euler_a", 6.0, 3, 1024, 768, "モデル", (("スタイル", 0.7),)),
        # A negative prompt that itself starts with "Negative prompt:" and has two lines.
        GenerationInfo("a cat", "Negative prompt: x\nsecond line", 25, "ddim", 6.0, 3, 1024, 768, "m"),
        # A tag inside the prompt stays text; only the trailing ones are the LoRAs.
        GenerationInfo("a <lora:inline:1.0> cat", "", 25, "euler", 6.0, 3, 1024, 768, "m", (("x", 2.0),)),
    ],
)
def test_parameters_round_trip_through_a_real_png_file(tmp_path, info):
    path = tmp_path / "out" / "image.png"
    save_png(path, Image.new("RGB", (16, 8), (200, 30, 30)), info)
    assert parse_parameters(parameters_text(info)) == info
    assert read_generation_info(path) == info
    with Image.open(path) as image:
        assert (image.format, image.size, image.getpixel((3, 3))) == ("PNG", (16, 8), (200, 30, 30))
        assert image.text["parameters"] == parameters_text(info)


def test_png_bytes_hold_the_parameters_chunk():
    data = png_bytes(Image.new("RGB", (4, 4)), EXAMPLE)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"tEXtparameters\x00a photo of sks dog, sitting <lora:my_dog:0.8>" in data


def test_parameters_written_by_a1111_are_read():
    text = (
        "masterpiece, 1girl <lora:foo:0.7>\n"
        "Negative prompt: worst quality\n"
        'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, '
        'Model: v1-5-pruned-emaonly, Lora hashes: "foo: 12ab34cd", Version: v1.10.1'
    )
    assert parse_parameters(text) == GenerationInfo(
        "masterpiece, 1girl", "worst quality", 20, "dpm++_2m_karras", 7.0, 1234, 512, 768, "v1-5-pruned-emaonly", (("foo", 0.7),)
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("a cat\nSampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512", "no 'Steps'"),
        ("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512", "Size '512' is not WIDTHxHEIGHT"),
        ("a cat\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8", "Steps 'many' is not a whole number"),
        ("a cat\nSteps: 20, Sampler: LMS, CFG scale: 7, Seed: 1, Size: 8x8", "unknown sampler 'LMS'"),
        ("just a prompt", "no 'Size'"),
    ],
)
def test_incomplete_parameters_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_parameters(text)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "a cat <lora:x:1>"}, "ends with a <lora:...> tag"),
        ({"prompt": "a cat\nNegative prompt: dog"}, "cannot start with 'Negative prompt:'"),
        ({"loras": (("a:b", 1.0),)}, "cannot be written as a <lora:...> tag"),
        ({"loras": (("a", float("nan")),)}, "must be a finite number"),
    ],
)
def test_infos_that_would_not_read_back_the_same_are_refused(change, message):
    info = GenerationInfo(**{**EXAMPLE.__dict__, **change})
    with pytest.raises(ValueError, match=message):
        parameters_text(info)


def test_a_png_without_parameters_is_a_value_error(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ValueError, match="no 'parameters' text chunk"):
        read_generation_info(path)


def test_a_file_that_is_not_a_png_is_a_value_error(tmp_path):
    path = tmp_path / "image.jpg"
    Image.new("RGB", (4, 4)).save(path, format="JPEG")
    with pytest.raises(ValueError, match="not a PNG image"):
        read_generation_info(path)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a PNG image"):
        read_generation_info(text)


def test_save_png_replaces_an_existing_file_whole(tmp_path: Path):
    path = tmp_path / "image.png"
    path.write_bytes(b"old")
    save_png(path, Image.new("RGB", (4, 4)), EXAMPLE)
    assert read_generation_info(path) == EXAMPLE
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
