"""Jobs: the background-job registry and processes, run folders, and in-process background threads."""
