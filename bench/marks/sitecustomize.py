"""Marks of a job's hand-off inside the bench's worker (``bench/suite.py``, jobs phase).

The bench starts ``imagepub worker`` with this directory first on ``PYTHONPATH`` and
``IMAGEPUB_BENCH_MARKS`` naming a directory, so the interpreter imports this module before
anything else (``site``'s sitecustomize). Each process of the worker then appends
``<unix time> <moment>`` lines to a file of its own there, for these moments:

- ``read``: the main process' event loop finds the Redis connection of its ``BRPOP`` readable
  (kombu ``Channel._brpop_read``): the message is there;
- ``held``: kombu has recorded it as delivered and unacknowledged (``QoS.append``: in memory;
  with its acknowledgement emulation, which imagepub turns off, after a Redis transaction);
- ``received``: Celery has made the task request (``task_received``), before handing it to the
  pool;
- ``prerun``: a pool process starts the task (``task_prerun``).

The job's ``started_at`` (its lease taken, ``workers/jobs.py``) closes the hand-off. A mark
costs one ``write`` to a file already open. Nothing here runs in any other process.

With ``IMAGEPUB_BENCH_WORKER_POOL`` (``bench/run --worker-pool``, an experiment) the worker runs
Celery's pool of that name instead of prefork, whatever its command line says.
"""

import os

_DIRECTORY = os.environ.get("IMAGEPUB_BENCH_MARKS")

if _DIRECTORY:
    import time

    from celery import signals
    from kombu.transport import redis as _redis_transport
    from kombu.transport.virtual import base as _virtual

    _files: dict[int, int] = {}

    def mark(moment: str) -> None:
        pid = os.getpid()  # a pool process has its own file
        fd = _files.get(pid)
        if fd is None:
            fd = _files[pid] = os.open(os.path.join(_DIRECTORY, str(pid)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, f"{time.time():.6f} {moment}\n".encode())

    _brpop_read = _redis_transport.Channel._brpop_read
    _append = _virtual.QoS.append  # the Redis transport's own QoS ends in it too

    def _read(self, **options):
        mark("read")
        return _brpop_read(self, **options)

    def _held(self, message, delivery_tag):
        result = _append(self, message, delivery_tag)
        mark("held")
        return result

    _redis_transport.Channel._brpop_read = _read
    _virtual.QoS.append = _held
    signals.task_received.connect(lambda **_: mark("received"), weak=False)
    signals.task_prerun.connect(lambda **_: mark("prerun"), weak=False)

    _POOL = os.environ.get("IMAGEPUB_BENCH_WORKER_POOL")
    if _POOL:
        from celery import concurrency
        from celery.bin import worker as _worker_command

        # celery's command line turns --pool (default prefork) into the pool class as it parses
        _worker_command.WorkersPool.convert = lambda self, value, param, ctx: concurrency.get_implementation(_POOL)
