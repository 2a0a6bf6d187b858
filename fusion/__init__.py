"""bevjepa.fusion."""
