"""Endpoint discovery: a static endpoints file, or Kubernetes."""
