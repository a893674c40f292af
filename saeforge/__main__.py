import sys

from saeforge.cli import run

sys.exit(run())
