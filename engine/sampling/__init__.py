"""Sampling: the sigmas a job walks (schedules), the samplers' steps as pure functions over
per-row sigmas, their registry, and each job's plan of engine steps."""
