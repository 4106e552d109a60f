"""``python -m epp.workers``: one worker of ``epp --workers N``, started by the supervisor
(its settings arrive on stdin; not for running by hand)."""

from epp.workers.worker import main

if __name__ == "__main__":
    raise SystemExit(main())
