"""Benchmarks: they write JSON + Markdown + PNG under ``runs/``; they are not tests."""
