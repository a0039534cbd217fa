"""``python -m simclrv2`` (and ``torchrun -m simclrv2``) runs the command-line interface."""
import sys

from simclrv2.cli import main

sys.exit(main())
