import os
import sys

# The tests import their shared matrix as `testing`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
