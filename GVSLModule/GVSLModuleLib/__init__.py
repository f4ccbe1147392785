"""GVSL Slicer module library: MRML adapters, logic and background jobs (no Qt)."""
