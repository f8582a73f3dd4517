"""Helpers shared by the tests: real processes on loopback and gRPC plumbing."""
