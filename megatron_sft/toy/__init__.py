"""Tiny models and toy tasks that the demo and the continuum ship with (tests use them too)."""
