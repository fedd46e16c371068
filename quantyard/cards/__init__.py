"""Model cards and CycloneDX ML-BOMs for catalog artifacts: pure functions of plain dicts
(``Artifact.to_dict()``, ``Source.to_dict()``, ``catalog.lineage(...)``), standard library only,
so the API can serve them without heavy imports."""

from .mlbom import MEDIA_TYPE as BOM_MEDIA_TYPE
from .mlbom import ml_bom
from .model_card import model_card

__all__ = ["BOM_MEDIA_TYPE", "ml_bom", "model_card"]
