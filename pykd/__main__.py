"""`python -m pykd`: the pykd command line."""
import sys

from .cli import main

sys.exit(main())
