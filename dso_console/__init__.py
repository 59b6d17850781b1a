"""The DSO's console: a web server between an operator's browser and the hub's public HTTP API (``dso-console``)."""
