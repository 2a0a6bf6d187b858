"""bevjepa.evaluation."""
