import os
import sys

# The tools are scripts (run as `python tools/x.py`), so tests import them as top-level modules.
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)
