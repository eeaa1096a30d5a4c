"""What a request and a key may ask of the service, one module per idea:

    nul_bytes   no NUL byte in any string of a request (PostgreSQL cannot store one): 422
    job_size    a job's steps, seq_len, batch_size, training tokens and metadata size: 422
    per_key     a key's request rate (429 + Retry-After) and its open event streams (429)
    middleware  the ASGI bounds in front of the app: the body size (413) and requests inside it at once

The bounds are settings (service/settings.py), so an operator with bigger GPUs raises them; the
defaults refuse a job of days. Breaking one is a 4xx problem document, never a 500.
"""
