"""Quantyard: convert and quantize ML models for edge and CPU deployment."""

__version__ = "0.1.0"
