"""`write_report` and the plots: offline HTML, loss plot and sample grid from a synthetic run history."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image

from lora_trainer.errors import UserError
from lora_trainer.report.history import RunHistory, SampleRecord, history_path
from lora_trainer.report.html import NO_SAMPLES, NO_VALIDATION, write_report
from lora_trainer.report.plots import BEST_COLOR, HIGHLIGHT, moving_average, write_loss_curve

NAME = "demo"
PROMPTS = ["a <b>cat</b> & dog", "a house for $5 and $6"]
VALIDATION = {0: 0.30, 1: 0.22, 2: 0.15, 3: 0.18}  # epoch 2 is the best
LORA_FILES = {2: "demo-000002.safetensors", 3: "demo.safetensors"}


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def _train_losses(count: int = 30) -> list[float]:
    # Decreasing with a deterministic wiggle, so the raw and smoothed curves differ.
    return [0.4 / (1 + step / 10) + 0.03 * ((step * 7) % 5 - 2) for step in range(count)]


def _write_sample(path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path)


def _full_history(folder) -> RunHistory:
    history = RunHistory(name=NAME, steps_per_epoch=10, prompts=list(PROMPTS), train_losses=_train_losses())
    for epoch, loss in VALIDATION.items():
        record = history.epoch_record(epoch, step=epoch * 10)
        record.validation_loss = loss
        record.lora_file = LORA_FILES.get(epoch)
    for epoch in VALIDATION:
        for index, prompt in enumerate(PROMPTS):
            image = f"samples/{NAME}-e{epoch}-p{index}.png"
            _write_sample(folder / image, (60 * epoch, 100 + 100 * index, 200))
            history.samples.append(SampleRecord(epoch, epoch * 10, index, prompt, seed=1, image=image))
    return history


@pytest.fixture
def run_dir(tmp_path):
    _full_history(tmp_path).save(history_path(tmp_path, NAME))
    return tmp_path


def _colors(path) -> set[tuple[int, int, int]]:
    with Image.open(path) as image:
        return {color for _, color in image.convert("RGB").getcolors(maxcolors=1 << 20)}


def _samples_table(page: str) -> str:
    match = re.search(r'<table class="samples">(.*?)</table>', page, re.DOTALL)
    assert match, "no samples table"
    return match.group(1)


def _epochs_table_rows(page: str) -> list[str]:
    match = re.search(r'<table class="epochs">(.*?)</table>', page, re.DOTALL)
    assert match, "no epochs table"
    return re.findall(r"<tr.*?</tr>", match.group(1), re.DOTALL)[1:]  # without the header


def test_report_writes_the_loss_plot_grid_and_page(run_dir):
    page = write_report(run_dir, NAME)

    assert page == run_dir / f"{NAME}-report.html"
    assert page.is_file()
    with Image.open(run_dir / f"{NAME}-report-loss.png") as loss:
        assert loss.format == "PNG" and loss.size == (1000, 500)
    with Image.open(run_dir / f"{NAME}-report-grid.png") as grid:
        assert grid.format == "PNG"
        # Four rows of 240-pixel cells under a header: taller than wide with two columns.
        assert grid.height > 4 * 200 and grid.width > 2 * 200 and grid.height > grid.width
    assert not list(run_dir.rglob("*.tmp"))


def test_best_epoch_is_marked_in_both_pictures(run_dir):
    write_report(run_dir, NAME)

    assert _hex_rgb(BEST_COLOR) in _colors(run_dir / f"{NAME}-report-loss.png")  # the star
    assert _hex_rgb(HIGHLIGHT) in _colors(run_dir / f"{NAME}-report-grid.png")  # the row label box


def test_page_is_self_contained(run_dir):
    html = write_report(run_dir, NAME).read_text(encoding="utf-8")

    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 1 + 8  # the loss plot and 4 epochs x 2 prompts
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    for source in sources:
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == "PNG"
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html and "href=" not in html and "url(" not in html


def test_page_escapes_text_from_the_history(run_dir):
    html = write_report(run_dir, NAME).read_text(encoding="utf-8")

    assert "a &lt;b&gt;cat&lt;/b&gt; &amp; dog" in html
    assert "<b>cat" not in html and "& dog" not in html


def test_page_names_the_best_epoch_and_every_saved_file(run_dir):
    html = write_report(run_dir, NAME).read_text(encoding="utf-8")

    assert f"<title>{NAME}: lora-train report</title>" in html
    assert "best: epoch 2 (validation loss 0.15), <code>demo-000002.safetensors</code>" in html
    assert NO_VALIDATION not in html
    rows = _epochs_table_rows(html)
    assert len(rows) == 4
    assert [row for row in rows if 'class="best"' in row] == [rows[2]]
    assert "epoch 2" in rows[2] and "0.15" in rows[2] and "demo-000002.safetensors" in rows[2]
    assert "baseline" in rows[0] and "0.3" in rows[0]
    assert "not saved" in rows[1]
    assert "demo.safetensors" in rows[3]


def test_samples_table_has_a_row_per_epoch_and_a_column_per_prompt(run_dir):
    table = _samples_table(write_report(run_dir, NAME).read_text(encoding="utf-8"))

    rows = re.findall(r"<tr.*?</tr>", table, re.DOTALL)
    header, epochs = rows[0], rows[1:]
    assert header.count("<th>") == 1 + len(PROMPTS)
    assert [re.search(r'<th scope="row">(baseline|epoch \d)', row).group(1) for row in epochs] == [
        "baseline", "epoch 1", "epoch 2", "epoch 3",
    ]
    assert [row.count("<img") for row in epochs] == [2, 2, 2, 2]
    assert table.count("<img") == 8
    assert 'class="best"' in epochs[2] and all('class="best"' not in row for row in epochs[:2] + epochs[3:])
    assert "demo-000002.safetensors" in epochs[2] and "not saved" in epochs[1]


def test_a_deleted_sample_shows_as_missing(run_dir):
    (run_dir / f"samples/{NAME}-e1-p0.png").unlink()
    (run_dir / f"samples/{NAME}-e3-p1.png").write_bytes(b"not an image")

    table = _samples_table(write_report(run_dir, NAME).read_text(encoding="utf-8"))

    assert table.count("<img") == 6
    assert table.count('<td class="missing">missing</td>') == 2
    assert (run_dir / f"{NAME}-report-grid.png").is_file()


def test_a_run_without_validation_or_samples_still_gets_a_loss_plot_and_page(tmp_path):
    RunHistory(name=NAME, steps_per_epoch=10, train_losses=_train_losses()).save(history_path(tmp_path, NAME))

    html = write_report(tmp_path, NAME).read_text(encoding="utf-8")

    loss_plot = tmp_path / f"{NAME}-report-loss.png"
    with Image.open(loss_plot) as loss:
        assert loss.size == (1000, 500)
    assert _hex_rgb(BEST_COLOR) not in _colors(loss_plot)
    assert not (tmp_path / f"{NAME}-report-grid.png").exists()
    assert NO_VALIDATION in html and NO_SAMPLES in html
    assert "steps: 30" in html


def test_a_run_with_nothing_recorded_gets_an_empty_report(tmp_path):
    RunHistory(name=NAME, steps_per_epoch=10).save(history_path(tmp_path, NAME))

    html = write_report(tmp_path, NAME).read_text(encoding="utf-8")

    assert (tmp_path / f"{NAME}-report-loss.png").is_file()
    assert NO_VALIDATION in html and NO_SAMPLES in html


def test_validation_on_another_scale_and_epochs_without_samples(tmp_path):
    history = RunHistory(name=NAME, steps_per_epoch=10, train_losses=_train_losses())
    history.epoch_record(1, 10).validation_loss = 40.0  # far above the training loss: drawn on its own axis
    history.epoch_record(2, 20).validation_loss = 30.0
    history.save(history_path(tmp_path, NAME))

    html = write_report(tmp_path, NAME).read_text(encoding="utf-8")

    assert "best: epoch 2 (validation loss 30), LoRA not saved at this epoch" in html
    assert _hex_rgb(BEST_COLOR) in _colors(tmp_path / f"{NAME}-report-loss.png")


def test_missing_history_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=f"{NAME}-history.json"):
        write_report(tmp_path, NAME)


def test_report_imports_neither_torch_nor_pyplot(run_dir):
    script = (
        "import sys; from pathlib import Path; from lora_trainer.report.html import write_report; "
        f"write_report(Path({str(run_dir)!r}), {NAME!r}); "
        "print(sorted(m for m in ('torch', 'diffusers', 'matplotlib.pyplot') if m in sys.modules))"
    )
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_loss_curve_keeps_its_size_with_and_without_losses(tmp_path):
    for losses in (_train_losses(), []):
        path = tmp_path / f"curve-{len(losses)}.png"
        write_loss_curve(path, losses, "demo: training loss")
        with Image.open(path) as curve:
            assert curve.size == (800, 400)


def test_moving_average_is_bias_corrected():
    assert moving_average([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert moving_average([0.0, 10.0], smoothing=0.5) == pytest.approx([0.0, 5 / 0.75])
