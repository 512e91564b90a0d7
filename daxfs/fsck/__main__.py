"""`python -m daxfs.fsck IMAGE [--repair|-y]`."""
import sys

from .run import main

sys.exit(main())
