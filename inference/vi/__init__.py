"""Not yet implemented: see the open issues."""

__all__: list[str] = []
