"""One module per eviction policy; each defines one ``PolicyUnit`` subclass (registered by
being defined).  See ``policies/registry.py``."""
