"""`python -m daxfs.fsck IMAGE [--repair]`."""
import sys

from .run import main

sys.exit(main())
