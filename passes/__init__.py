"""Graph passes over ATen-level FX graphs: pure functions that know nothing about model classes."""
