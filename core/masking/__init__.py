"""Masking: which response tokens leave the loss (STM and its controls), and the masked-set export."""
