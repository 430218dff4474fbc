"""One run: the driver, the plan of the output's work, the read and write stages, commits and progress."""
