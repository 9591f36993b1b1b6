"""Recipes: multi-step compression schedules composed from pass objects and the core's training loop."""
