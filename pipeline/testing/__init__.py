"""For tests and the demo: the tiny JoyCaption-shaped model, sample images, and the fault hooks tests
inject into a run."""
