"""Minimal baseline servers for ``broker bench --compare`` (run as scripts)."""
