"""`lmstack run ARGS...` in a subprocess that interrupts itself right after the trainer's
optimizer step LMSTACK_TEST_STOP_AT, with the signal LMSTACK_TEST_SIGNAL (SIGKILL: no cleanup
at all; SIGINT: Ctrl-C). Used by test_run_resume.py."""
import os
import signal
import sys

from lmstack.cli.main import main

stop_at = int(os.environ.get("LMSTACK_TEST_STOP_AT", "0"))
if stop_at:
    from lmstack.train.trainer import Trainer

    train_step = Trainer.train_step

    def interrupted_step(self):
        rec = train_step(self)
        if self.step == stop_at:           # after the update, before its metrics line is written
            os.kill(os.getpid(), getattr(signal, os.environ.get("LMSTACK_TEST_SIGNAL", "SIGKILL")))
        return rec

    Trainer.train_step = interrupted_step

sys.exit(main(sys.argv[1:]))
