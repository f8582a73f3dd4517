"""Benchmarks of the collab hub beside the raw libraries and python-socketio.

`python -m bench` (or `make bench`) runs the full suite; `--smoke` a tiny one;
`python -m bench.soak` the bounded soak (agents at the rate limit, 500 clients). Every
figure is reported with its ratio to the peer and to the raw limit measured in the same
run, which stays meaningful on a noisy machine.
"""
