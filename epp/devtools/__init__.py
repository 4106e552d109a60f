"""Local process orchestration shared by `make run`, the tests and the benchmarks.

These helpers start real processes (epp-sim pods, the EPP, Envoy) on free loopback
ports and stop them cleanly. They expect to run from a source checkout (they read
``deploy/envoy/envoy.yaml``).
"""
