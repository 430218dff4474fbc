"""What a caption is: the JoyCaption prompt catalog, modes and their settings, clean-up, glitch checks,
and the 384 x 384 image the model sees. The lowest layer: it imports nothing else of the pipeline."""
