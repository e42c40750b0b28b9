"""Compiled native helpers (cffi). Private: import the wrappers in sessmob.* instead."""
