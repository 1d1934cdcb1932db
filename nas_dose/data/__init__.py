"""Data layer: OpenKBP import, HDF5 storage, synthetic phantoms, model inputs."""
