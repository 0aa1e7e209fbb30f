"""normzoo's built-in plugins. They register through the same hooks as any installed plugin."""
