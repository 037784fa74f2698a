"""Loading a trained run (or a base model) and generating reviews with it: shared by evaluation and generation."""
