"""Progress in logs and pipes is plain lines at a steady cadence; on a terminal it stays a tqdm bar."""

from __future__ import annotations

import io
import sys

from tqdm.std import tqdm

from lora_trainer.progress import LineProgress, _clock_time, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_training_prints_a_line_per_five_percent_with_postfix_rate_and_eta():
    out, clock = io.StringIO(), FakeClock()
    with progress_bar(total=40, desc="training", unit="step", file=out, clock=clock, leave=True, dynamic_ncols=True) as bar:
        assert isinstance(bar, LineProgress)
        for step in range(1, 41):
            clock.now += 0.4  # 2.5 steps/s
            bar.set_postfix(epoch=f"{(step - 1) // 10 + 1}/4", loss="0.1234", lr="1.00e-03", refresh=False)
            bar.update(1)
    printed = lines(out)
    assert [line.split(" ")[1] for line in printed] == [f"{n}/40" for n in range(2, 41, 2)]
    assert printed[7] == "training: 16/40 steps, epoch 2/4, loss 0.1234, lr 1.00e-03, 2.5 steps/s, ETA 0:10"
    assert printed[-1] == "training: 40/40 steps, epoch 4/4, loss 0.1234, lr 1.00e-03, 2.5 steps/s, ETA 0:00"
    assert "\r" not in out.getvalue()
    assert (bar.n, bar.total) == (40, 40)


def test_a_slow_run_prints_every_thirty_seconds_between_the_marks():
    out, clock = io.StringIO(), FakeClock()
    bar = progress_bar(total=1000, desc="training", unit="step", file=out, clock=clock)
    for _ in range(160):
        clock.now += 1.0  # 5% is 50 s here, so the 30 s rule comes first
        bar.update()
    done = [int(line.split(" ")[1].split("/")[0]) for line in lines(out)]
    assert done == [30, 50, 80, 100, 130, 150]
    bar.close()
    assert lines(out)[-1] == "training: 160/1000 steps, 1.0 steps/s, ETA 14:00"  # the state not yet printed


def test_close_prints_the_last_state_once():
    out, clock = io.StringIO(), FakeClock()
    with progress_bar(total=40, desc="training", unit="step", file=out, clock=clock) as bar:
        for _ in range(3):
            clock.now += 1.0
            bar.update()
    bar.close()
    assert [line.split(",")[0] for line in lines(out)] == ["training: 2/40 steps", "training: 3/40 steps"]


def test_nothing_is_printed_when_disabled():
    out, clock = io.StringIO(), FakeClock()
    with progress_bar(total=40, desc="caching latents", unit="img", disable=True, file=out, clock=clock) as bar:
        for _ in range(40):
            clock.now += 40.0
            bar.update(1)
    assert list(progress_bar([1, 2, 3], desc="checking images", unit="img", disable=True, file=out)) == [1, 2, 3]
    assert out.getvalue() == ""
    assert bar.n == 40


def test_iterating_counts_the_items_and_ends_with_a_line():
    out, clock = io.StringIO(), FakeClock()

    def drawings():
        for index in range(3):
            clock.now += 2.0
            yield index

    assert list(progress_bar(drawings(), desc="sampling", unit="img", file=out, clock=clock)) == [0, 1, 2]
    assert lines(out) == ["sampling: 3 imgs, 0.5 imgs/s"]  # no total, so no ETA

    out = io.StringIO()
    bar = progress_bar(["a", "b"], desc="checking images", unit="img", leave=False, file=out, clock=FakeClock())
    assert bar.total == 2 and list(bar) == ["a", "b"] and bar.n == 2
    assert lines(out) == ["checking images: 1/2 imgs", "checking images: 2/2 imgs"]  # no time passed: no rate


def test_bytes_read_like_tqdm():
    out, clock = io.StringIO(), FakeClock()
    with progress_bar(total=2_000_000_000, desc="hashing model.safetensors", unit="B", unit_scale=True, file=out, clock=clock) as bar:
        clock.now = 10.0
        bar.update(1_000_000_000)
    assert lines(out)[0] == "hashing model.safetensors: 1.00G/2.00GB, 100MB/s, ETA 0:10"


def test_eta_grows_hours_past_an_hour():
    assert _clock_time(7) == "0:07"
    assert _clock_time(3725) == "1:02:05"


def test_the_default_file_is_stderr_at_call_time(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(total=1, desc="training", unit="step", clock=FakeClock()) as bar:
        bar.update()
    assert sys.stderr.getvalue() == "training: 1/1 steps\n"


def test_a_terminal_still_gets_a_tqdm_bar():
    terminal = Terminal()
    with progress_bar(total=3, desc="training", unit="step", file=terminal) as bar:
        assert isinstance(bar, tqdm)
        bar.set_postfix(loss="0.1234", refresh=False)
        bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
