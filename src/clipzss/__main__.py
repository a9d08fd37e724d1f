"""`python -m clipzss` (also what torchrun launches: `torchrun --nproc-per-node N -m clipzss train ...`)."""

import sys

from clipzss.cli import main

sys.exit(main())
