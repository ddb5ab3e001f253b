"""Generated training data: Self-Output and Rephrase runs, and the stores of generated answers and sets."""
