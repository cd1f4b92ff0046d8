"""``python -m ckptstore`` runs the command line."""
import sys

from ckptstore.cli.main import main

sys.exit(main())
