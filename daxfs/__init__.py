"""daxfs: a DAX + reflink filesystem in one persistent-memory image."""
__version__ = "0.1.0"
