"""``python -m lightning_gradwatch report LOGDIR ...``: the ``gradwatch`` console script."""

import sys

from lightning_gradwatch.report.cli import main

sys.exit(main())
