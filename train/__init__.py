"""reslab's training core: data, models, engine, tracking. ``tune`` and ``demo`` build on it."""

__version__ = "0.1.0"
