"""Where versions are published: base.Target, and its local and remote implementations."""
