"""Files -> validated users. Knows nothing of torch, models or training."""
from .schema import (DataError, Query, TaskData, User, data_fingerprint, iter_json_array, load_golds,
                     load_task_data, load_users, summarize, write_json_atomic)

__all__ = ["DataError", "Query", "TaskData", "User", "data_fingerprint", "iter_json_array", "load_golds",
           "load_task_data", "load_users", "summarize", "write_json_atomic"]
