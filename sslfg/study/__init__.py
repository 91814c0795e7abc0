"""The study: its arms in order (run), the layout of its folder (layout) and the report built from it (report)."""
