"""``python -m flows ...`` is ``lagent ...``: dvc.yaml calls ``python -m flows stage NAME``."""

import sys

from flows.cli import main

sys.exit(main())
