"""Preemption: SIGTERM / SIGINT during training end the run with a checkpoint that resumes exactly (docs/reliability.md).

    PreemptionCallback   finish the optimizer step, save Trainer's checkpoint, stop; a second signal exits at once
    resume_command       the command line that continues the run

The lifecycle (lifecycle.py) saves the trainer state, prints the resume command and returns `exit_code`, the same for
pretraining and every TRL method.
"""

import os
import shlex
import signal
import sys
import threading
import time

from transformers import TrainerCallback

from .health import any_rank

LAUNCHER_REPEAT_S = 10.0  # under a launcher, a signal repeated this soon after the first is the same request


class PreemptionCallback(TrainerCallback):
    """SIGTERM or SIGINT during training: the current optimizer step finishes, Trainer saves its own checkpoint
    (so `--resume_from_checkpoint true` continues exactly) and training stops; the lifecycle (lifecycle.run) then
    saves the trainer state, prints the resume command and exits with `exit_code` (128 + signal: 143 for SIGTERM, 130 for SIGINT). A second signal
    exits at once with that code, without a checkpoint (under a launcher: one that comes LAUNCHER_REPEAT_S seconds or
    more after the first). With several processes every rank writes its part of the checkpoint before any exits.
    The handlers are installed only during `train()`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or 0)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        received = any_rank(self.received or 0)
        if received:
            self.received = received
            control.should_save = True
            control.should_training_stop = True

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None and self._repeat_of_first():
            return
        if self.received is not None:
            print(f"hfllm: second {name}: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received, self._first_at = signum, time.monotonic()
        print(f"hfllm: {name} received: finishing the current optimizer step, then saving a checkpoint "
              f"(send {name} again to exit at once)", file=sys.stderr, flush=True)

    def _repeat_of_first(self) -> bool:
        """Under a launcher or a scheduler the first signal often arrives twice: SLURM signals every process of a job
        step and torchrun / accelerate launch / srun forward the signal they got to their workers. A repeat within
        LAUNCHER_REPEAT_S seconds there is the same request, not a second one."""
        launched = any(key in os.environ for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"))
        return launched and time.monotonic() - self._first_at < LAUNCHER_REPEAT_S


def resume_command(prog: str, argv: list[str]) -> str:
    """The command line that continues this run: `argv` with `--resume_from_checkpoint true` instead of any
    resume_from_checkpoint it had. A run given a recipe mapping (the Python API) is continued by the same call with
    resume_from_checkpoint=True."""
    if argv and not isinstance(argv[0], str):
        return f"the same {prog.replace(' ', '.')}(...) call with resume_from_checkpoint=True"
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume_from_checkpoint":
            skip = True
            continue
        if not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    return f"{prog} {shlex.join([*kept, '--resume_from_checkpoint', 'true'])}"
