"""The Celery worker: runs consa for one job at a time and records everything in the database."""
