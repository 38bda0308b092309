"""PNG figures of a run: the loss curve and timestep histogram beside the LoRA, and the report's loss plot and
sample grid.

Drawn with matplotlib's object API (a `Figure` on an Agg canvas), never pyplot: pyplot keeps global
state and picks a GUI backend, while a bare figure is safe in threads and needs no display.
"""

from __future__ import annotations

import io
import math
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from lora_trainer.files import write_bytes_atomic
from lora_trainer.report.history import RunHistory

DPI = 100
RAW_COLOR, SMOOTH_COLOR = "#bccdeb", "#1950c8"
VALIDATION_COLOR, BEST_COLOR, BASELINE_COLOR = "#d9541e", "#1a9641", "#777777"
HIGHLIGHT = "#fff0a0"
GRID_CELL_INCHES = 2.4  # width of a sample cell; its height follows the samples' aspect ratio
GRID_THUMBNAIL_PIXELS = 384  # plenty for a 2.4-inch cell at 100 dpi; bounds memory for 1024-px samples


@dataclass
class GridRow:
    """One row of the sample grid: an epoch's label, its LoRA file and one image per prompt column."""

    label: str  # "baseline" or "epoch N"
    lora_file: str
    best: bool
    images: list[Path | None]  # None: no sample recorded for that prompt


def write_loss_curve(path: Path, losses: Sequence[float], title: str) -> None:
    """Per-step loss (light) and its exponential moving average (dark) against the step, 800x400 pixels."""
    figure = _figure(800, 400)
    axes = figure.add_subplot()
    axes.set_title(title, parse_math=False)
    if losses:
        _draw_training_loss(axes, losses)
        axes.legend(loc="upper right")
    else:
        axes.set_xticks([])
        axes.set_yticks([])
        _note(axes, "no losses recorded")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    write_bytes_atomic(path, _png_bytes(figure))


def write_timestep_histogram(path: Path, counts: Sequence[int], probabilities: Sequence[float], title: str) -> None:
    """The share of drawn timesteps per bin of 1/50 of the schedule (bars), under the configured distribution's
    share of each bin (line), 800x400 pixels. `counts[t]` and `probabilities[t]` are per timestep t; the counts
    are the main process's own draws (the others draw from the same distribution), so no step waits to gather them."""
    width = max(1, len(probabilities) // 50)
    starts = list(range(0, len(probabilities), width))
    expected = [sum(probabilities[start : start + width]) for start in starts]
    drawn = [sum(counts[start : start + width]) for start in starts]
    total = sum(drawn)
    figure = _figure(800, 400)
    axes = figure.add_subplot()
    axes.set_title(title, parse_math=False)
    if total:
        axes.bar(starts, [count / total for count in drawn], width=width, align="edge", color=RAW_COLOR,
                 label=f"drawn: {total} timesteps (main process)")
    else:
        _note(axes, "no timesteps drawn yet")
    axes.step(starts + [len(probabilities)], expected + expected[-1:], where="post", color=SMOOTH_COLOR, linewidth=2,
              label="configured distribution")
    axes.set_xlim(0, len(probabilities))
    axes.set_xlabel("timestep")
    axes.set_ylabel(f"share of draws per {width} timesteps")
    axes.legend(loc="best")
    write_bytes_atomic(path, _png_bytes(figure))


def moving_average(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, so the first points are not pulled toward zero."""
    averaged, running = [], 0.0
    for count, value in enumerate(values, start=1):
        running = smoothing * running + (1 - smoothing) * value
        averaged.append(running / (1 - smoothing**count))
    return averaged


def loss_report_png(history: RunHistory, title: str) -> bytes:
    """Training loss per step with validation loss per evaluated epoch on the same step axis."""
    figure = _figure(1000, 500)
    axes = figure.add_subplot()
    axes.set_title(title, parse_math=False)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    evaluated = [record for record in history.epochs if record.validation_loss is not None]
    if not history.train_losses and not evaluated:
        axes.set_xticks([])
        axes.set_yticks([])
        _note(axes, "no losses recorded yet")
        return _png_bytes(figure)
    if history.train_losses:
        _draw_training_loss(axes, history.train_losses)
    if evaluated:
        validation_losses = [record.validation_loss for record in evaluated]
        separate = history.train_losses and _scales_differ(history.train_losses, validation_losses)
        validation_axes = axes.twinx() if separate else axes
        if separate:
            axes.set_ylabel("training loss")
            validation_axes.set_ylabel("validation loss", color=VALIDATION_COLOR)
        validation_axes.margins(y=0.12)  # room for the "best" label below the lowest point
        _draw_validation_loss(validation_axes, history)
    _legend_below(figure, axes, validation_axes if evaluated else axes)
    return _png_bytes(figure)


def sample_grid_png(prompts: Sequence[str], rows: Sequence[GridRow], title: str) -> bytes:
    """Sample images, one row per epoch and one column per prompt; a missing file leaves a labelled empty cell."""
    thumbnails = [[_thumbnail(path) if path is not None else None for path in row.images] for row in rows]
    titles = [_column_title(prompt) for prompt in prompts]
    label_inches, header_inches = _row_label_inches(rows), _header_inches(titles)
    cell_height = GRID_CELL_INCHES * _cell_aspect(thumbnails)
    width = label_inches + GRID_CELL_INCHES * len(prompts) + 0.2
    height = header_inches + cell_height * len(rows) + 0.2
    # Margins are set by hand: the row labels sit outside the axes, where a layout engine would not look.
    figure = _figure(round(width * DPI), round(height * DPI), layout=None)
    figure.suptitle(title, y=1 - 0.1 / height, va="top", parse_math=False)
    figure.subplots_adjust(
        left=label_inches / width, right=1 - 0.1 / width,
        top=1 - header_inches / height, bottom=0.1 / height, wspace=0.04, hspace=0.04,
    )
    cells = figure.subplots(len(rows), len(prompts), squeeze=False)
    for cell, column_title in zip(cells[0], titles):
        cell.set_title(column_title, fontsize=8, parse_math=False)
    for row, cells_of_row, images in zip(rows, cells, thumbnails):
        _label_row(cells_of_row[0], row)
        for cell, path, image in zip(cells_of_row, row.images, images):
            _fill_cell(cell, image, "missing" if path is not None else "no sample")
    return _png_bytes(figure)


def _draw_training_loss(axes: Axes, losses: Sequence[float]) -> None:
    # Loss number i is measured during step i + 1, so step 0 stays free for the baseline.
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, color=RAW_COLOR, linewidth=1, label="training loss per step")
    axes.plot(steps, moving_average(losses), color=SMOOTH_COLOR, linewidth=2, label="moving average")


def _draw_validation_loss(axes: Axes, history: RunHistory) -> None:
    evaluated = [record for record in history.epochs if record.validation_loss is not None]
    steps = [record.step for record in evaluated]
    losses = [record.validation_loss for record in evaluated]
    axes.plot(steps, losses, color=VALIDATION_COLOR, marker="o", label="validation loss per epoch")
    baseline = next((record for record in evaluated if record.epoch == 0), None)
    if baseline is not None:
        axes.axhline(baseline.validation_loss, color=BASELINE_COLOR, linestyle="--", linewidth=1,
                     label=f"baseline (before training): {baseline.validation_loss:.4g}")
    best = history.best_epoch()
    if best is not None:
        axes.plot([best.step], [best.validation_loss], linestyle="none", marker="*", markersize=18,
                  color=BEST_COLOR, markeredgecolor="black", label=f"best: epoch {best.epoch}", zorder=5)
        axes.annotate(f"best: epoch {best.epoch}", (best.step, best.validation_loss), xytext=(10, -18),
                      textcoords="offset points", color=BEST_COLOR, fontweight="bold")


def _scales_differ(train_losses: Sequence[float], validation_losses: Sequence[float]) -> bool:
    """Whether validation needs its own y axis: on a shared one it would be flattened against training."""
    train = [value for value in train_losses if math.isfinite(value)]
    validation = [value for value in validation_losses if math.isfinite(value)]
    if not train or not validation:
        return False
    low, high = sorted((abs(statistics.median(train)), abs(statistics.median(validation))))
    return high > 3 * low


def _legend_below(figure: Figure, axes: Axes, other: Axes) -> None:
    # One legend for both y axes, under the plot, where it can hide neither curve.
    handles, labels = axes.get_legend_handles_labels()
    if other is not axes:
        more_handles, more_labels = other.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    figure.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)


def _label_row(cell: Axes, row: GridRow) -> None:
    label = f"{row.label} (best)\n{row.lora_file}" if row.best else f"{row.label}\n{row.lora_file}"
    box = {"facecolor": HIGHLIGHT, "edgecolor": BEST_COLOR, "boxstyle": "round"} if row.best else None
    cell.text(-0.06, 0.5, label, transform=cell.transAxes, ha="right", va="center", fontsize=8,
              fontweight="bold" if row.best else "normal", bbox=box, parse_math=False)


def _fill_cell(cell: Axes, image: Image.Image | None, empty_note: str) -> None:
    cell.set_xticks([])
    cell.set_yticks([])
    for spine in cell.spines.values():
        spine.set_color("#dddddd")
    if image is not None:
        cell.imshow(image)
    else:
        cell.set_facecolor("#f4f4f4")
        _note(cell, empty_note)


def _thumbnail(path: Path) -> Image.Image | None:
    """The image scaled down for a grid cell, or None when the file is gone or unreadable."""
    try:
        with Image.open(path) as image:
            image.thumbnail((GRID_THUMBNAIL_PIXELS, GRID_THUMBNAIL_PIXELS))
            return image.convert("RGB")
    except OSError:  # includes a deleted file and PIL's UnidentifiedImageError
        return None


def _column_title(prompt: str) -> str:
    return textwrap.fill(textwrap.shorten(prompt, width=100, placeholder=" …"), width=34)


def _cell_aspect(thumbnails: Sequence[Sequence[Image.Image | None]]) -> float:
    """Height over width of the first readable sample, so cells fit the samples without blank bands."""
    first = next((image for images in thumbnails for image in images if image is not None), None)
    return 1.0 if first is None else min(max(first.height / first.width, 0.5), 2.0)


def _header_inches(titles: Sequence[str]) -> float:
    # Room for the figure title and the tallest wrapped prompt, about 0.14 inch per line at 8 points.
    return 0.5 + 0.14 * max((title.count("\n") + 1 for title in titles), default=1)


def _row_label_inches(rows: Sequence[GridRow]) -> float:
    # About 0.07 inch per character at 8 points, so long LoRA file names are not cut at the left edge.
    longest = max((len(line) for row in rows for line in (row.label + " (best)", row.lora_file)), default=10)
    return max(1.2, 0.07 * longest + 0.4)


def _note(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="#888888")


def _figure(width_pixels: int, height_pixels: int, layout: str | None = "constrained") -> Figure:
    figure = Figure(figsize=(width_pixels / DPI, height_pixels / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)  # attaches itself; savefig then renders with Agg, whatever pyplot's backend is
    return figure


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
