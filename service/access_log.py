"""Keep health probes and Prometheus scrapes out of uvicorn's access log (``SAFL_ACCESS_LOG_PROBES``).

An orchestrator probing ``/healthz``/``/readyz`` every few seconds and Prometheus scraping
``/metrics`` every 5 s would otherwise bury the ``/recognize`` lines. A probe that *fails*
(status 400 or above: not ready, draining, a scraper without the API key) is still logged.
"""

from __future__ import annotations

import logging

#: Paths whose successful requests are left out of the access log.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

ACCESS_LOGGER = "uvicorn.access"


class ProbeAccessFilter(logging.Filter):
    """Drops uvicorn access records for ``PROBE_PATHS`` answered below 400; passes everything else.

    uvicorn logs ``'%s - "%s %s HTTP/%s" %d'`` with args (client, method, path?query,
    http version, status); a record of any other shape passes untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        path, status = args[2], args[4]
        if not isinstance(path, str) or not isinstance(status, int):
            return True
        return not (path.split("?", 1)[0] in PROBE_PATHS and status < 400)


def configure_probe_access_log(log_probes: bool) -> None:
    """Install (``log_probes=False``) or remove (``True``) the filter on the ``uvicorn.access`` logger.

    Call it after ``uvicorn.Config(...)``, which (re)configures uvicorn's loggers; calling it
    again replaces the earlier filter instead of stacking another one.
    """
    logger = logging.getLogger(ACCESS_LOGGER)
    for existing in [f for f in logger.filters if isinstance(f, ProbeAccessFilter)]:
        logger.removeFilter(existing)
    if not log_probes:
        logger.addFilter(ProbeAccessFilter())
