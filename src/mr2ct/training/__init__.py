"""Keeping long runs alive and observed: Lightning callbacks, checkpoint writing, pre-emption, NaN guard, resume."""
