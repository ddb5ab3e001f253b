"""Training: the config, the (input_ids, labels) data, the TRL trainer and its callbacks."""
