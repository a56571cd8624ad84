"""Reports on training runs: ``sfpo report`` and ``sfpo compare``."""
