"""The node daemon (``cascade serve``): one store shared by the engine processes of a node."""
