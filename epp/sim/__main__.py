"""Allow ``python -m epp.sim``."""

from epp.sim.cli import main

raise SystemExit(main())
