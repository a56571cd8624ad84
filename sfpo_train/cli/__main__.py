"""``python -m sfpo_train.cli``: the same as the ``sfpo`` command."""

import sys

from sfpo_train.cli import main

sys.exit(main())
