"""The job database: models, engine set-up and the fair, crash-safe queue.

This package imports neither ``bot`` nor ``engine``: both talk to it, never the other way round.
"""
