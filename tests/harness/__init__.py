"""Test harnesses that live outside the shipped package (the data-path exerciser)."""
