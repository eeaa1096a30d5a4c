"""The consa allocation service: a thin FastAPI layer over the database; the worker runs consa."""
