"""Data files shipped with the engine (the default imatrix calibration text)."""
