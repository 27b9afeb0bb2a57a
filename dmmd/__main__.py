"""``python -m dmmd`` runs the command line."""
import sys

from dmmd.apps.cli import main

sys.exit(main())
