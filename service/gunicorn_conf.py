"""gunicorn settings for ``imagepub serve`` (command-line flags and GUNICORN_CMD_ARGS override them)."""

import multiprocessing
import os

# One event loop per core, and one more for the moment one is busy with CPU (a build context's
# or an archive's headers checked): gunicorn's "2 × cores + 1" is for sync workers, whose process
# waits on each request's I/O; a gevent worker does not. Measured on 2 cores (issue 14): 2, 3
# and 5 workers serve the same requests a second within the machine's noise, and each worker
# process costs about 60 MiB.
workers = min(multiprocessing.cpu_count() + 1, 9)
# gevent, with a deadline on reading each request (service/gunicorn_worker.py, README "Design"):
# a slow client or a live event stream costs a greenlet, not one of a few threads.
worker_class = "service.gunicorn_worker.ApiWorker"
# Connections (greenlets) per worker process. Slow clients are dropped within seconds, so what
# fills it is live event streams and bursts.
worker_connections = 1000
# The arbiter's heartbeat: a worker whose event loop is stuck this long is replaced. It does not
# bound a request (an event stream lasts as long as its job).
timeout = 30
graceful_timeout = 30
# Also the time a client has to send a request's head, idle time before it included (gevent's
# worker reads each head under this timeout).
keepalive = 5
# Long enough for any cursor the API accepts, so an over-long one gets a problem+json 422 from
# the app rather than a bare 414 from gunicorn.
limit_request_line = 8190
# No header decides the request's scheme here (gunicorn believes X-Forwarded-Proto from loopback
# by default): the app does, only behind as many proxies as `console.trusted_proxies` says.
secure_scheme_headers = {}
# gunicorn's control socket (for `gunicornc`) defaults to $HOME, which is read-only in the image:
# keep it in /tmp, one per server (this file is read by the arbiter), so that two servers on one
# host never take each other's socket.
control_socket = f"/tmp/imagepub-gunicorn-{os.getpid()}.ctl"
# Each worker proves it is alive by touching a file every second (os.fchmod), in its event loop:
# on a disk-backed /tmp that call can block for as long as the disk stalls, and with it every
# request of the process (gunicorn's docs, "Blocking OS calls"). Kept in memory where there is a
# tmpfs (/dev/shm: every Linux host, Docker and Kubernetes give one).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
# Logs go to stderr as JSON lines: the access log included.
accesslog = "-"
errorlog = "-"
# The access log's line is built by the same formatter as every other line (service/logs.py
# JsonLines): it receives the request's atoms and writes them as fields, numbers as numbers.
access_log_format = "%(m)s %(U)s %(s)s"
# ... and its atoms are only those fields (gunicorn's own logger gathers every header and the whole
# environ for each line: GET /v1/jobs/{id} is 1.25-1.4× as fast without that, service/gunicorn_worker.py).
logger_class = "service.gunicorn_worker.AccessLogger"
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "service.logs.JsonLines"}},
    "filters": {"redact": {"()": "service.logs.RedactingFilter"}},
    # the access log's record carries the request's atoms as its arguments: no redaction pass
    # there (it would fold them into the message; the atoms hold no header or query string)
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr", "filters": ["redact"]},
                 "access": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {"gunicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                "gunicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False}},
}


def worker_abort(worker):
    """A worker the arbiter aborts (its event loop stuck for ``timeout`` seconds) says first
    what every greenlet was doing, in one log line: the stuck one names the cause."""
    from gevent.util import format_run_info  # noqa: PLC0415 - gevent is the worker's, not the arbiter's

    worker.log.critical("worker %s stuck for %s s; its greenlets:\n%s", worker.pid, worker.timeout, "\n".join(format_run_info()))
