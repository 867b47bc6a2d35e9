"""Test support that ships with the package: the multi-rank check harness."""
