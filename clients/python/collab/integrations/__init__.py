"""Integrations with agent frameworks and OpenTelemetry. Each module imports its
framework, installed with the matching extra (``pip install 'collab-hub[otel]'``);
importing this package imports none of them."""
