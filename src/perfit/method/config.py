"""`PerFitConfig`: what a saved set of shifts is, in the manner of peft's adapter config. Saved as `perfit_config.json`
beside the tensors (and inside each tensors file's metadata, so one atomically replaced file says everything)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..config import parse_positions

FORMAT_VERSION = 1
FORMS = ("loreft",)  # delta(h) = R^T (W h + b - R h), R with orthonormal rows


@dataclass(frozen=True)
class PerFitConfig:
    hidden_size: int  # the base model's hidden width the shifts act on
    layers: list[int] = field(default_factory=list)  # decoder layers whose outputs are shifted (0-based)
    rank: int = 0  # the collective shift's rank (0: no collective shift)
    user_rank: int = 1  # each user's personal shift's rank
    positions: str = "f1+l1"  # the prompt positions shifted: the first f and last l tokens of each prompt
    form: str = "loreft"  # the shift's formula (FORMS)
    task_name: str = ""  # what the shifts were trained for (a LaMP task name)
    base_model: str = ""  # the base model they were trained on (its name or path)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        problems = []
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            problems.append(f"hidden_size {self.hidden_size!r}: a positive integer")
        if not self.layers or not all(isinstance(l, int) and l >= 0 for l in self.layers):
            problems.append(f"layers {self.layers!r}: a non-empty list of decoder layer indices")
        if not isinstance(self.rank, int) or self.rank < 0:
            problems.append(f"rank {self.rank!r}: an integer >= 0")
        if not isinstance(self.user_rank, int) or not 1 <= self.user_rank <= max(self.hidden_size, 1):
            problems.append(f"user_rank {self.user_rank!r}: an integer in 1..hidden_size")
        if self.form not in FORMS:
            problems.append(f"form {self.form!r}: choose from {', '.join(FORMS)}")
        if self.format_version != FORMAT_VERSION:
            problems.append(f"format_version {self.format_version!r}: this PerFit reads version {FORMAT_VERSION}")
        try:
            parse_positions(self.positions)
        except ValueError as e:
            problems.append(f"positions {self.positions!r}: {e}")
        if problems:
            raise ValueError("PerFitConfig: " + "; ".join(problems))

    @classmethod
    def from_run(cls, cfg, hidden_size: int) -> "PerFitConfig":
        """What a run's shifts are (`cfg`: a resolved RunConfig with absolute layers)."""
        return cls(hidden_size, list(cfg.layers), cfg.low_rank_dimension, cfg.user_low_rank_dimension, cfg.positions,
                   task_name=cfg.task_name, base_model=cfg.model_name or cfg.model_path)

    @property
    def first_last(self) -> tuple[int, int]:
        return parse_positions(self.positions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, where: str = "perfit_config") -> "PerFitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown} (known: {sorted(known)})")
        if "hidden_size" not in d:
            raise ValueError(f"{where}: field 'hidden_size' is missing")
        try:
            return cls(**{k: (list(v) if k == "layers" else v) for k, v in d.items()})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
