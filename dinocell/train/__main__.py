"""`python -m dinocell.train ...` is the same command as `dinocell train ...`."""

import sys

from dinocell.train.train import main

sys.exit(main())
