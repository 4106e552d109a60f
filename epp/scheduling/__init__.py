"""Scheduling: pick endpoints for a request from candidates and their state."""
