"""Captioning models (MSMedCap and its baselines). Free of Celery, database and web code."""
