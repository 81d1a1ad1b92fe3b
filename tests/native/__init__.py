"""Tests of scep-fast."""
