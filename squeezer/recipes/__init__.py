"""Recipes: multi-step compression schedules composed from pass objects and the core's training loop."""

from .stages import Recipe, Stage

__all__ = ["Recipe", "Stage"]
