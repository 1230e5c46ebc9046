"""Throughput accounting and profiling."""
