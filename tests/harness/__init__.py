"""Test harnesses, not shipped in daxfs: the data-path exerciser, crash states, image fuzzing, kill -9 of the daemon."""
