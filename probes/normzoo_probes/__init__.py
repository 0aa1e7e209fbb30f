"""Probe metrics for normzoo (filled in by the probes work)."""
