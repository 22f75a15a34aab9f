"""``python -m samkit ...`` and ``torchrun --nproc_per_node N -m samkit train ...``: the samkit command."""

import sys

from samkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
