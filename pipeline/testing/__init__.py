"""Helpers for tests and the demo: the tiny JoyCaption-shaped model and sample images."""
