"""``samkit train`` whose N-th training step is stopped by Ctrl-C (KeyboardInterrupt), on every rank alike.

    torchrun ... tests/experiments/interrupted_train.py N train --data ... --out DIR

Run by test_fsdp_train.py to leave a checkpoint that ``--resume`` continues.
"""

from __future__ import annotations

import sys

from samkit.cli import main
from samkit.experiments import trainer

if __name__ == "__main__":
    stop_at, real_step, calls = int(sys.argv[1]), trainer.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    trainer.train_step = interrupted
    sys.exit(main(sys.argv[2:]))
