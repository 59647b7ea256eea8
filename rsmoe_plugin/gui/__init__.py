"""The plugin's widgets (main thread only)."""
