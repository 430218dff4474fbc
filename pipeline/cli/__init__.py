"""Every command, registered in one place (`main.build_parser`); the console; submit, jobs and plan."""
