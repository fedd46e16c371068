"""Recipe identity: what was asked of which input by which engine, hashed canonically.

The engine's plan owns recipes (quantyard/engine/plan.py); this module keeps the older import
path working for the catalog's tests and tools.
"""

from __future__ import annotations

from quantyard.engine.plan import artifact_recipe, canonical_json, make_recipe, recipe_hash

__all__ = ["artifact_recipe", "canonical_json", "make_recipe", "recipe_hash"]
