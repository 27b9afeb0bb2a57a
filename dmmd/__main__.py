"""``python -m dmmd`` runs the command line."""
import sys

from dmmd.cli import main

sys.exit(main())
