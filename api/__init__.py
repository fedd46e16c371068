"""Quantyard HTTP API (FastAPI). Build the app with :func:`api.app.create_app`."""
