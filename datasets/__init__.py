"""bevjepa.datasets."""
