"""Test harnesses: crash states, image fuzzing, kill -9 of the daemon (not shipped in daxfs)."""
