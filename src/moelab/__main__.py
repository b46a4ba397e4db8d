"""``python -m moelab`` = the ``moelab`` command (also what ``torchrun -m moelab`` runs)."""

import sys

from moelab.cli import main

sys.exit(main())
