"""Streaming readers: every supported input format -> :class:`Document` or :class:`ReadError`."""
