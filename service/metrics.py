"""Prometheus metrics of the API process. Job counts come from the database at scrape time, so they
are right whichever process (API or worker) changed a job."""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request

from service.crud import job_records
from service.db import sessionmaker_for
from service.models import STATUSES


class JobsByStatus:
    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self):
        gauge = GaugeMetricFamily("consa_jobs", "Jobs in the database by status.", labels=["status"])
        try:
            with sessionmaker_for(self.database_url)() as session:
                counts = job_records.count_jobs_by_status(session)
        except Exception:  # a scrape must not fail because the database is down; /readyz reports that
            return
        for status in STATUSES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge


class Metrics:
    """One registry per app, so several apps in one process (tests) do not clash."""

    def __init__(self, database_url: str):
        self.registry = CollectorRegistry()
        self.requests = Counter("consa_http_requests_total", "HTTP requests.", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("consa_http_request_duration_seconds", "HTTP request latency.", ["method", "route"],
                                 registry=self.registry)
        self.jobs_created = Counter("consa_jobs_created_total", "Jobs accepted by this API process.",
                                    registry=self.registry)
        self.registry.register(JobsByStatus(database_url))

    async def middleware(self, request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        # The route template, not the raw path: job ids would make a new series per job.
        route = getattr(request.scope.get("route"), "path", "unmatched")
        self.requests.labels(request.method, route, str(response.status_code)).inc()
        self.latency.labels(request.method, route).observe(time.perf_counter() - start)
        return response
