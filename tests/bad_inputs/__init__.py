"""The bad-input corpus: committed data files, manifest.json, and recipes.py for the binary inputs."""
