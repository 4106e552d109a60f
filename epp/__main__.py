"""`python -m epp`: the endpoint picker."""

from epp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
