"""Errors raised by samkit.data."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched places and could not be downloaded.

    The message lists where samkit looked and how to get the files (package, URL, --data-dir).
    """
