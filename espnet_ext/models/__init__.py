"""ESPnetASRModel subclasses selected with ``model:`` in a training YAML."""
