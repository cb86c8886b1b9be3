"""`python -m dinocell.train ...` is `dinocell train ...` (what torchrun launches)."""

import sys

from dinocell.commands.train import main

sys.exit(main())
