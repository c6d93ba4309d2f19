"""The SQLite results store. Never imports torch or Textual: browsing is instant."""

from store.db import Store, TraceInfo, TraceWriter, default_db_path
from store.errors import StoreError

__all__ = ["Store", "StoreError", "TraceInfo", "TraceWriter", "default_db_path"]
