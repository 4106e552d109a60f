"""``epp --workers N``: N endpoint-picker processes on one ext_proc port.

The ``epp`` process becomes a supervisor (:mod:`epp.workers.supervisor`): it validates
the configuration once, makes the self-signed certificate once, starts N workers
(``python -m epp.workers``, :mod:`epp.workers.worker`), restarts any that die, serves
gRPC health and ``/metrics`` (merged, :mod:`epp.workers.merge`) for all of them, and
forwards SIGTERM for a graceful drain. Each worker is a full replica: its own discovery,
KV-event subscriptions, index and scrapes, bound to the ext_proc port with SO_REUSEPORT
so the kernel spreads Envoy's connections over them.

This package sits above :mod:`epp.runner` (it runs apps); nothing below imports it.
"""
