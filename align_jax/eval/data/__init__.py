"""Bundled instruction-following prompt sets (constraints_*.jsonl) and the script that writes the demo one."""
