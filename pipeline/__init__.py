"""Caption image datasets at scale with JoyCaption on Ray Data and vLLM."""

__version__ = "0.1.0"
