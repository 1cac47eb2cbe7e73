"""`python -m ensemble.cli`: the `ensemble` command (replica processes are started this way)."""

from __future__ import annotations

import sys

from ensemble.cli import main

sys.exit(main())
