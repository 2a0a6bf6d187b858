"""bevjepa.prediction."""
