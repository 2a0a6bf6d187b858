"""bevjepa.tools."""
