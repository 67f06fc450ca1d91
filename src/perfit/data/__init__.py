"""Files -> validated users. Knows nothing of torch, models or training."""
from .overlap import OverlapCheck
from .schema import (DataError, Query, TaskData, User, atomic_path, data_fingerprint, iter_json_array, latest,
                     load_golds, load_task_data, load_users, summarize, validate_items, write_json_atomic)

__all__ = ["DataError", "OverlapCheck", "Query", "TaskData", "User", "atomic_path", "data_fingerprint", "iter_json_array",
           "latest", "load_golds", "load_task_data", "load_users", "summarize", "validate_items", "write_json_atomic"]
