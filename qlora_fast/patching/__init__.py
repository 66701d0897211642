"""The patches patch_model installs, one module per switch (qlora_fast/patch.py lists them)."""
