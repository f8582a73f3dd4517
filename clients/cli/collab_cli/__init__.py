"""The `collab` command: `collab up` runs the hub on one machine."""
