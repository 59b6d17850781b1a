"""The DSO's HTTP API, one router per resource."""
