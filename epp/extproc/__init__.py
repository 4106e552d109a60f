"""Envoy ext_proc: the gRPC servicer and the per-stream protocol state machine."""
