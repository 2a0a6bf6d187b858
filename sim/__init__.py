"""bevjepa.sim."""
