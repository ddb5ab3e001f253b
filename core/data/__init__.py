"""Data: the example records every source becomes, built-in tasks, user files and hub datasets."""
