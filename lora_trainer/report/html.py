"""`lora-train report`: a run's loss plot, epoch table and sample grid, as PNGs and one offline HTML page.

Everything comes from the run history and the sample images beside it, so a report can be made from an
interrupted run or on another machine. The page embeds every image as a data URI and loads nothing
from the network, so it can be mailed or archived as a single file. No torch import: the command starts fast.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from lora_trainer.files import write_bytes_atomic, write_text_atomic
from lora_trainer.report.history import RunHistory, history_path
from lora_trainer.report.plots import GridRow, loss_report_png, sample_grid_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NO_VALIDATION = "no validation loss recorded; set validation in the config"
NO_SAMPLES = "no sample images recorded for this run"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
tr.best { background: #fff0a0; font-weight: bold; }
.tag { background: #1a9641; color: white; border-radius: 3px; padding: 0 4px; font-size: 0.8em; }
.samples img { width: 256px; height: auto; display: block; }
.samples th { max-width: 256px; font-weight: normal; }
.samples td.missing { color: #888; text-align: center; vertical-align: middle; }
.note { color: #666; font-style: italic; }
img.plot { max-width: 100%; }
"""


def write_report(output_dir: Path, name: str) -> Path:
    """Write `<name>-report-loss.png`, `<name>-report-grid.png` (when there are samples) and
    `<name>-report.html` into `output_dir`; return the HTML's path. A missing history raises UserError."""
    history = RunHistory.load(history_path(output_dir, name))
    loss_png = loss_report_png(history, f"{name}: loss")
    write_bytes_atomic(output_dir / f"{name}-report-loss.png", loss_png)
    prompts, rows = sample_rows(history, output_dir)
    grid_path = output_dir / f"{name}-report-grid.png"
    if rows:
        write_bytes_atomic(grid_path, sample_grid_png(prompts, rows, f"{name}: samples"))
    else:
        grid_path.unlink(missing_ok=True)  # one left by an earlier report would contradict this page
    page = output_dir / f"{name}-report.html"
    write_text_atomic(page, report_html(name, history, loss_png, prompts, rows))
    return page


def sample_rows(history: RunHistory, output_dir: Path) -> tuple[list[str], list[GridRow]]:
    """The prompts (columns) and one row per epoch with samples, baseline first.

    When one epoch has several samples of a prompt, the last recorded one is shown.
    """
    columns = sorted(set(range(len(history.prompts))) | {sample.prompt_index for sample in history.samples})
    prompts = [_prompt_text(history, index) for index in columns]
    images = {(sample.epoch, sample.prompt_index): output_dir / sample.image for sample in history.samples}
    best = history.best_epoch()
    rows = [
        GridRow(
            label=epoch_label(epoch),
            lora_file=_lora_file_of(history, epoch),
            best=best is not None and best.epoch == epoch,
            images=[images.get((epoch, index)) for index in columns],
        )
        for epoch in sorted({sample.epoch for sample in history.samples})
    ]
    return prompts, rows


def report_html(name: str, history: RunHistory, loss_png: bytes, prompts: list[str], rows: list[GridRow]) -> str:
    """The whole page; every piece of text from the history is escaped, every image is a data URI."""
    title = html.escape(f"{name}: lora-train report")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>',
        "<body>",
        f"<h1>{title}</h1>",
        _summary_html(history),
        "<h2>Loss</h2>",
        f'<img class="plot" src="{_data_uri(loss_png)}" alt="training and validation loss">',
        "<h2>Epochs</h2>",
        _epoch_table_html(history),
        "<h2>Samples</h2>",
        _samples_table_html(prompts, rows),
        "</body>",
        "</html>",
        "",
    ])


def epoch_label(epoch: int) -> str:
    return "baseline" if epoch == 0 else f"epoch {epoch}"


def _summary_html(history: RunHistory) -> str:
    steps = max([len(history.train_losses)] + [record.step for record in history.epochs])
    epochs = max([record.epoch for record in history.epochs] + [sample.epoch for sample in history.samples], default=0)
    items = [f"steps: {steps} ({history.steps_per_epoch} per epoch)", f"epochs: {epochs}"]
    best = history.best_epoch()
    if best is None:
        items.append(NO_VALIDATION)
    else:
        file = f"<code>{html.escape(best.lora_file)}</code>" if best.lora_file else "LoRA not saved at this epoch"
        items.append(f"best: epoch {best.epoch} (validation loss {best.validation_loss:.4g}), {file}")
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _epoch_table_html(history: RunHistory) -> str:
    if not history.epochs:
        return '<p class="note">no epochs evaluated or saved yet</p>'
    best = history.best_epoch()
    lines = ['<table class="epochs">', "<tr><th>epoch</th><th>step</th><th>validation loss</th><th>LoRA file</th></tr>"]
    for record in history.epochs:
        is_best = best is not None and record.epoch == best.epoch
        tag = ' <span class="tag">best</span>' if is_best else ""
        loss = f"{record.validation_loss:.4g}" if record.validation_loss is not None else "–"
        lines.append(
            f"<tr{_best_class(is_best)}><td>{epoch_label(record.epoch)}{tag}</td><td>{record.step}</td>"
            f"<td>{loss}</td><td>{html.escape(_lora_file_of(history, record.epoch))}</td></tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def _samples_table_html(prompts: list[str], rows: list[GridRow]) -> str:
    if not rows:
        return f'<p class="note">{NO_SAMPLES}</p>'
    header = "".join(f"<th>{html.escape(prompt)}</th>" for prompt in prompts)
    lines = ['<table class="samples">', f"<tr><th></th>{header}</tr>"]
    for row in rows:
        tag = ' <span class="tag">best</span>' if row.best else ""
        cells = "".join(_sample_cell_html(path, prompt, row.label) for path, prompt in zip(row.images, prompts))
        lines.append(
            f'<tr{_best_class(row.best)}><th scope="row">{row.label}{tag}<br>'
            f"<code>{html.escape(row.lora_file)}</code></th>{cells}</tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def _sample_cell_html(path: Path | None, prompt: str, label: str) -> str:
    if path is None:
        return '<td class="missing">no sample</td>'
    uri = _image_data_uri(path)
    if uri is None:
        return '<td class="missing">missing</td>'
    return f'<td><img src="{uri}" alt="{html.escape(f"{label}: {prompt}")}"></td>'


def _image_data_uri(path: Path) -> str | None:
    """A sample as a PNG data URI (other formats converted), or None when the file is gone or unreadable."""
    try:
        data = path.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            with Image.open(io.BytesIO(data)) as image:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
    except OSError:  # includes PIL's UnidentifiedImageError
        return None
    return _data_uri(data)


def _best_class(best: bool) -> str:
    return ' class="best"' if best else ""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _prompt_text(history: RunHistory, index: int) -> str:
    if index < len(history.prompts):
        return history.prompts[index]
    return next(sample.prompt for sample in history.samples if sample.prompt_index == index)


def _lora_file_of(history: RunHistory, epoch: int) -> str:
    if epoch == 0:
        return "no LoRA (before training)"
    record = next((record for record in history.epochs if record.epoch == epoch), None)
    return record.lora_file if record is not None and record.lora_file else "not saved"
