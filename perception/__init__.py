"""bevjepa.perception."""
