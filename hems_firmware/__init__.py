"""The home energy management gateway: polls meters and plugs, executes the hub's requests, reports back."""
