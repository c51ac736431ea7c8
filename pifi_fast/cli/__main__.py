"""`python -m pifi_fast.cli ...`: the pifi-fast command (scripts and torchrun launch it so)."""
import sys

from pifi_fast.cli import main

sys.exit(main())
