"""The method's home: what a set of shifts is (`PerFitConfig`), the device bank of users' shift factors
(`ShiftBank`), and saving, loading and applying shifts outside a run (`PerFitShifts`: `save_pretrained`,
`from_pretrained`, `applied` for a Hugging Face model's own forward and `generate`)."""
from .bank import ShiftBank
from .config import PerFitConfig
from .io import PerFitShifts

__all__ = ["PerFitConfig", "PerFitShifts", "ShiftBank"]
