"""Benchmarks of veralab.fast against PEFT; each script prints one table of ratios (see README.md here)."""
