"""Request control: the director between the Envoy stream and the scheduler."""
