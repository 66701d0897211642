"""Regression harness: the same training steps on stock peft and on patch_model, compared."""
