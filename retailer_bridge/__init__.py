"""A retailer's bridge (the paper's Retailer Platform): relays between the hub and its customers' gateways."""
