"""``python -m bench write|load|compress|train`` — see ``bench.cli``."""
from bench.cli import main

raise SystemExit(main())
