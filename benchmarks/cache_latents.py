"""Throughput and peak memory of `lora-train cache-latents` as the dataset grows.

    python benchmarks/cache_latents.py                                # 1,000 and 10,000 images, 64 px
    python benchmarks/cache_latents.py --counts 100 1000 --resolution 128

For each count it generates that many small PNG images (coloured shapes, each with its own caption,
deterministic from a seed) in a temporary folder, then runs the caching in a fresh child process, as
`lora-train cache-latents` does, on the builtin tiny SDXL-shaped model (built on first use under
$LORA_TRAIN_HOME, default ~/.cache/lora-train):

- cold: an empty cache, so every image is VAE-encoded;
- warm: the same cache again, so every latent is reused (what a `train` start on a cached dataset pays:
  each image's bytes hashed, each cache file checked).

The config is the minimal one, whose text encoders train (the default), so only latents are cached;
caption embeddings are cached too only when both text encoders are frozen.

Seconds are the child's whole wall time (Python start, imports and model loading included; the
baseline line shows how much of it that fixed part is). Peak RSS is the child's own high-water mark
(VmHWM). The caches live on disk, so the RSS column should not grow with the count; the difference
between the largest and the smallest count is printed to show whether it does. Image generation is not
timed. This script prints figures only and never asserts on time; record them in
benchmarks/results.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}

# Runs in the child. `cache` does what `lora-train cache-latents` does (load the config, precache);
# `baseline` stops after the imports and the config, which is the part of the RSS no image adds to.
# VmHWM is read rather than ru_maxrss: on Linux ru_maxrss also counts the parent's memory at the
# moment of the fork, VmHWM only this process's own address space.
CHILD = """
import json, sys
from pathlib import Path
from lora_trainer.config.load import load_config
config = load_config(Path(sys.argv[2]))
lines = []
if sys.argv[1] == "cache":
    from lora_trainer.cache.fill import precache
    lines = precache(config, show_progress=False)
else:
    import diffusers, torch
def peak_rss_kib():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak
print(json.dumps({"lines": lines, "peak_rss_kib": peak_rss_kib()}))  # the last line of stdout
"""


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float
    lines: list[str]


def generate_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` PNGs of 1-3 coloured rectangles and ellipses, each with a caption naming them and its number
    (every caption distinct, as in a real captioned dataset)."""
    folder.mkdir(parents=True)
    names = list(COLOURS)
    for index in range(count):
        rng = random.Random(seed * 1_000_003 + index)
        background = rng.choice(names)
        image = Image.new("RGB", (size, size), COLOURS[background])
        draw = ImageDraw.Draw(image)
        shapes = []
        for _ in range(rng.randint(1, 3)):
            colour, shape = rng.choice(names), rng.choice(["square", "circle"])
            x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
            box = (x0, y0, x0 + rng.randint(size // 8, size // 2), y0 + rng.randint(size // 8, size // 2))
            (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
            shapes.append(f"a {colour} {shape}")
        image.save(folder / f"{index:05d}.png")
        caption = f"picture {index}, {' and '.join(shapes)} on {background}"
        (folder / f"{index:05d}.txt").write_text(caption, encoding="utf-8")


def write_config(path: Path, images: Path, cache: Path, output: Path, resolution: int) -> Path:
    config = {
        "model": {"pretrained": "builtin:tiny-sdxl"},
        "datasets": [{"path": str(images)}],
        "data": {"resolution": resolution, "cache_dir": str(cache)},
        "training": {"mixed_precision": "no"},  # fp32: the precision a CPU-only machine trains in
        "output": {"dir": str(output)},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_child(mode: str, config: Path) -> Run:
    """Time one fresh child process from start to exit and read back its report lines and peak RSS."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the builtin model needs nothing from the hub
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(config)], env=environment, capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the {mode} child failed (exit {done.returncode}):\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    return Run(seconds, result["peak_rss_kib"] / 1024, result["lines"])


def report_lines(run: Run) -> str:
    """The reuse counts from fill_caches's report (the bucket table is left out)."""
    return "; ".join(line for line in run.lines if line.startswith(("latents:", "text embeddings:")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000], help="dataset sizes to measure")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels and data.resolution")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cache-latents-bench-") as scratch:
        work = Path(scratch)
        # An untimed run on a few images first: it builds the builtin model if this machine has none yet and
        # brings torch's libraries into the page cache, so neither lands in the first timed run.
        generate_images(work / "warmup-images", 8, arguments.resolution)
        run_child("cache", write_config(work / "warmup.yaml", work / "warmup-images", work / "warmup-cache",
                                        work / "output", arguments.resolution))
        baseline = run_child("baseline", work / "warmup.yaml")
        print(f"baseline (imports torch + diffusers, loads the config): {baseline.seconds:.1f} s, "
              f"peak RSS {baseline.peak_rss_mib:.0f} MiB", flush=True)

        rows = []
        for count in arguments.counts:
            images = work / f"images-{count}"
            generate_images(images, count, arguments.resolution)
            config = write_config(work / f"{count}.yaml", images, work / f"cache-{count}", work / "output", arguments.resolution)
            cold, warm = run_child("cache", config), run_child("cache", config)
            print(f"{count} images: cold {report_lines(cold)}; warm {report_lines(warm)}", flush=True)
            rows.append((count, cold, warm))

    print()
    print(f"{'images':>7}  {'cold s':>7}  {'images/s':>8}  {'peak RSS MiB':>12}  {'warm s':>7}  {'warm RSS MiB':>12}")
    for count, cold, warm in rows:
        print(f"{count:7d}  {cold.seconds:7.1f}  {count / cold.seconds:8.1f}  {cold.peak_rss_mib:12.0f}  "
              f"{warm.seconds:7.1f}  {warm.peak_rss_mib:12.0f}")
    if len(rows) > 1:
        (small, small_cold, small_warm), (large, large_cold, large_warm) = rows[0], rows[-1]
        print(f"RSS difference {large} vs {small} images: cold {large_cold.peak_rss_mib - small_cold.peak_rss_mib:+.0f} MiB, "
              f"warm {large_warm.peak_rss_mib - small_warm.peak_rss_mib:+.0f} MiB")


if __name__ == "__main__":
    main()
