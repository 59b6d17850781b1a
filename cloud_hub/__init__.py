"""The Market Hub Platform's hub: the DSO's HTTP API, neutral access control, durable requests, MQTT relay."""
