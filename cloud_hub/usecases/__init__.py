"""The hub's use cases, one module each, between the HTTP/MQTT layers and storage: authorization first, then the
work. ``access`` (authorization and the data access log), ``idempotency`` (the ``Idempotency-Key`` protocol) and
``creating`` (storing a new request) are what the others share; ``registry``, ``data``, ``tariffs``,
``flexibility``, ``revisions`` and ``views`` are the use cases; ``results`` their typed answers."""
