"""`lora-train train` against the bare step, timed as whole processes, side by side.

    python benchmarks/speed.py --model small --runs 5                      # CPU: the figures of results.md
    python benchmarks/speed.py --model tiny --runs 5 --batch-size 4
    python benchmarks/speed.py --model sdxl-random --batch-size 4 --mixed-precision bf16 --steps 5 15   # GPU
    python benchmarks/speed.py --model small --other diffusers='accelerate launch train_text_to_image_lora_sdxl.py \
        --pretrained_model_name_or_path {model} --train_data_dir {data} --resolution {resolution} \
        --train_batch_size {batch_size} --rank {rank} --max_train_steps {steps} --output_dir {output}'

Each command runs to N1 and to N2 optimizer steps (`--steps`, default 5 and 25); its time per step is
(T(N2) - T(N1)) / (N2 - N1), so start-up, model loading, latent caching and the final save cancel. Every
figure is the median of `--runs` such pairs, with their range; runs of the commands are interleaved, so a
machine that slows down slows all of them alike. Peak RSS is each process's own (from wait4); peak GPU
memory is what the process reports (torch's allocator peak): lora-train's history file, the bare loop's line.

The bare loop (`bare_loop.py`) is forward + backward + AdamW + zero_grad on tensors made before the loop,
over the same modules; `--other NAME=TEMPLATE` adds any trainer, its template filled with {model} (the
diffusers folder), {data} (a folder of images with .txt captions; `{data_metadata}` is the same folder with a
diffusers `metadata.jsonl`), {resolution}, {batch_size}, {rank}, {steps}, {output} (a fresh folder) and
{python} (this interpreter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import RESOLUTIONS, model_folder  # noqa: E402
from bench_data import write_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass
class Timed:
    seconds: float
    peak_rss_gib: float
    peak_gpu_gib: float | None


@dataclass
class Contender:
    name: str
    command: str  # a template: {steps} and {output} change per run
    per_step: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    gpu: list[float] = field(default_factory=list)


def main() -> None:
    arguments = _parser().parse_args()
    work = arguments.work or Path(tempfile.gettempdir()) / "lora-train-speed"
    work.mkdir(parents=True, exist_ok=True)
    resolution = arguments.resolution or RESOLUTIONS[arguments.model]
    model = model_folder(arguments.model, work)
    data = write_dataset(work / "data" / f"{resolution}px", resolution)
    fields = {
        "model": str(model), "data": str(data), "data_metadata": str(data), "resolution": resolution,
        "batch_size": arguments.batch_size, "rank": arguments.rank, "python": sys.executable,
    }
    contenders = [
        Contender("lora-train", _lora_train_command(arguments, work, fields, max(arguments.steps))),
        *([Contender("bare loop", _bare_command(arguments, fields))] if arguments.bare else []),
        *(Contender(name, template) for name, template in (_named(other) for other in arguments.other)),
    ]
    small, large = arguments.steps
    print(f"model {arguments.model} ({model}), {resolution} px, batch {arguments.batch_size}, rank {arguments.rank}, "
          f"{arguments.mixed_precision}, {'checkpointing, ' if arguments.gradient_checkpointing else ''}"
          f"{_machine()}; {arguments.runs} runs of {small} and {large} steps each", flush=True)
    for contender in contenders if arguments.warmup else []:  # fills caches: latents, compiled kernels, the OS's files
        _run(contender, small, fields, work, arguments.verbose)
    for run in range(arguments.runs):
        for contender in contenders:
            short, long = (_run(contender, steps, fields, work, arguments.verbose) for steps in (small, large))
            contender.per_step.append((long.seconds - short.seconds) / (large - small))
            contender.rss.append(long.peak_rss_gib)
            if long.peak_gpu_gib is not None:
                contender.gpu.append(long.peak_gpu_gib)
            print(f"  run {run + 1}: {contender.name}: {short.seconds:.2f} s / {long.seconds:.2f} s -> {contender.per_step[-1]:.4f} s/step", flush=True)
    print(_table(contenders, arguments.batch_size))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(RESOLUTIONS), default="small")
    parser.add_argument("--resolution", type=int, help="default: the model's (tiny 128, small 256, sdxl-random 1024)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, nargs=2, default=(5, 25), metavar=("N1", "N2"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to lora-train train --set")
    parser.add_argument("--other", action="append", default=[], metavar="NAME=TEMPLATE", help="another trainer's command")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="leave out the bare loop (measured elsewhere)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="no untimed first run (caches already warm)")
    parser.add_argument("--work", type=Path, help="where models, data and outputs go (default: a folder in /tmp)")
    parser.add_argument("--verbose", action="store_true", help="print each command and keep its output in WORK/logs")
    return parser


def _lora_train_command(arguments: argparse.Namespace, work: Path, fields: dict, most_steps: int) -> str:
    images = len(list(Path(fields["data"]).glob("*.png")))
    config = {
        "model": {"pretrained": fields["model"]},
        # enough repeats that the longest run stays in its first epoch: no epoch-end work is timed
        "datasets": [{"path": fields["data"], "repeats": math.ceil(most_steps * arguments.batch_size / images) + 1}],
        "data": {"resolution": fields["resolution"], "cache_dir": str(work / "cache")},
        "network": {"rank": arguments.rank, "alpha": arguments.rank / 2, "train_text_encoder_1": False, "train_text_encoder_2": False},
        "training": {
            "batch_size": arguments.batch_size, "mixed_precision": arguments.mixed_precision, "optimizer": "adamw",
            "gradient_checkpointing": arguments.gradient_checkpointing,
        },
        "output": {"dir": "OUTPUT", "name": "speed"},
    }
    path = work / "lora-train-speed.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    sets = " ".join(f"--set {item}" for item in ["training.max_steps={steps}", "output.dir={output}", *arguments.set])
    return f"{{python}} -m lora_trainer train {path} {sets} --overwrite"


def _bare_command(arguments: argparse.Namespace, fields: dict) -> str:
    options = f"--resolution {{resolution}} --batch-size {{batch_size}} --rank {{rank}} --mixed-precision {arguments.mixed_precision}"
    checkpointing = " --gradient-checkpointing" if arguments.gradient_checkpointing else ""
    return f"{{python}} {HERE / 'bare_loop.py'} {{model}} --steps {{steps}} {options}{checkpointing}"


def _named(other: str) -> tuple[str, str]:
    name, separator, template = other.partition("=")
    if not separator or not template:
        raise SystemExit(f"--other {other!r}: give NAME=TEMPLATE, e.g. diffusers='python train.py --max_train_steps {{steps}} ...'")
    return name, template


def _run(contender: Contender, steps: int, fields: dict, work: Path, verbose: bool) -> Timed:
    safe_name = re.sub(r"[^\w.-]+", "-", contender.name)
    output = work / "outputs" / safe_name
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    command = contender.command.format(**fields, steps=steps, output=output)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{safe_name}-{steps}.log"
    if verbose:
        print("   ", command, flush=True)
    with log.open("w") as sink:
        start = time.perf_counter()
        process = subprocess.Popen(command, shell=True, stdout=sink, stderr=subprocess.STDOUT, cwd=HERE.parent)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{contender.name} failed with exit code {process.returncode}: {command}\n{log.read_text()[-3000:]}")
    # ru_maxrss is the largest of the shell and its children, in KiB on Linux
    return Timed(seconds, usage.ru_maxrss / 2**20, _reported_gpu_peak(log, output))


def _reported_gpu_peak(log: Path, output: Path) -> float | None:
    for history in output.glob("*-history.json"):
        value = json.loads(history.read_text()).get("peak_gpu_memory_gib")
        if value is not None:
            return value
    for line in log.read_text().splitlines():
        if line.startswith("bare: "):
            return json.loads(line[len("bare: "):]).get("peak_gpu_memory_gib")
    return None


def _table(contenders: list[Contender], batch_size: int) -> str:
    bare_loop = next((c for c in contenders if c.name == "bare loop"), None)
    bare = statistics.median(bare_loop.per_step) if bare_loop else None
    rows = [("", "s/step (median, min-max)", "images/s", "x bare", "peak RSS GiB", "peak GPU GiB")]
    for contender in contenders:
        median = statistics.median(contender.per_step)
        rows.append((
            contender.name,
            f"{median:.4f} ({min(contender.per_step):.4f}-{max(contender.per_step):.4f})",
            f"{batch_size / median:.2f}",
            f"{median / bare:.3f}" if bare else "-",
            f"{statistics.median(contender.rss):.2f}",
            f"{statistics.median(contender.gpu):.2f}" if contender.gpu else "-",
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("    " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


if __name__ == "__main__":
    main()
