"""Celery worker: thin tasks that hand job ids to the conversion pipeline."""
