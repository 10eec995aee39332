"""``python -m bench --help``: see ``bench.cli``."""

from bench.cli import main

raise SystemExit(main())
