"""Progress where no terminal watches: plain lines (step, loss, tokens/s, elapsed, ETA) after the
first step, then every `every_s` seconds and at the end; none when both outputs are terminals."""
import io
import json
import sys

from lmstack.train.progress import TrainProgress, line_stream
from train_toy import toy_trainer


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lines_every_n_seconds_with_eta():
    clock, out = Clock(), io.StringIO()
    p = TrainProgress(10, 0, every_s=10, stream=out, clock=clock)
    for step in range(1, 11):                 # 2 s per step; metrics every step
        clock.t += 2
        p.set_postfix(loss=5.0 - 0.25 * step, tok_s=1234.4, mfu=0.01)
        p.update(1)
    p.close()
    assert out.getvalue().splitlines() == [
        # step 1 at t=2: 9 steps left x 2 s
        "train step 1/10 (10%)  loss 4.750  1,234 tok/s  elapsed 0:02  ETA 0:18",
        # the next line once 10 s have passed since the last one: step 6 at t=12
        "train step 6/10 (60%)  loss 3.500  1,234 tok/s  elapsed 0:12  ETA 0:08",
        "train step 10/10 (100%)  loss 2.500  1,234 tok/s  elapsed 0:20",     # the last step, no ETA
    ]


def test_a_resumed_run_counts_its_eta_from_its_own_start():
    clock, out = Clock(), io.StringIO()
    p = TrainProgress(100, 40, every_s=1e9, stream=out, clock=clock)
    clock.t += 3
    p.update(1)
    p.close()
    assert out.getvalue() == "train step 41/100 (41%)  elapsed 0:03  ETA 2:57\n"   # 59 steps x 3 s


def test_where_the_lines_go(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("LMSTACK_NO_PROGRESS", raising=False)    # tests/conftest.py sets it
    out, err = io.StringIO(), Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert line_stream() is out                      # `make demo > log`: the log file gets the lines
    monkeypatch.setattr(sys, "stdout", Tty())
    assert line_stream() is None                     # a terminal: the bar on stderr is enough
    monkeypatch.setattr(sys, "stderr", out)
    assert line_stream() is out                      # `2> log`
    monkeypatch.setenv("LMSTACK_NO_PROGRESS", "1")
    assert line_stream() is None


def test_trainer_prints_lines_when_stdout_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    # capsys's stdout is no terminal: the trainer must say what it does
    monkeypatch.delenv("LMSTACK_NO_PROGRESS", raising=False)
    toy_trainer(tmp_path, max_steps=6).fit()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train step")]
    assert lines[0].startswith("train step 1/6 (17%)  loss ") and "ETA" in lines[0]
    assert lines[-1].startswith("train step 6/6 (100%)")
    last = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if '"split": "train"' in ln][-1]
    assert f"loss {last['loss']:.3f}" in lines[-1]
