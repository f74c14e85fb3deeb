"""hf_blockem."""
