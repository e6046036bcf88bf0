"""``python -m pyro_flows_ext ...`` is the ``pyro-flows`` command (also ``torchrun -m
pyro_flows_ext fit ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
