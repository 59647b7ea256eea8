"""The plugin's Processing provider (``rsmoe``) and its algorithms."""
