"""Deliberately naive implementations from the papers, for tests."""
