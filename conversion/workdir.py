"""The work folder of a conversion: layout, stage results and resumable checkpoints, each written atomically.

It sits next to the output folder (`.NAME.work`), so the output folder only ever appears complete. Rerunning the
same command picks up where the last save left off; a different recipe or teacher is refused.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


class WorkDirError(ValueError):
    pass


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class WorkDir:
    def __init__(self, output_dir: str | os.PathLike):
        output = Path(output_dir).resolve()
        self.root = output.with_name(f".{output.name}.work")

    def open(self, identity: dict) -> bool:
        """Creates the folder, or checks that an existing one belongs to the same run; True when resuming."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "run.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != json.loads(json.dumps(identity)):
                changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
                raise WorkDirError(
                    f"{self.root} holds an unfinished run with different settings ({changed}). Rerun with the "
                    f"same options to resume it, or delete {self.root} to start over."
                )
            return True
        self.write_json("run.json", identity)
        return False

    def path(self, name: str) -> Path:
        return self.root / name

    def write_json(self, name: str, data) -> None:
        text = json.dumps(data, indent=2) + "\n"
        _atomic_write(self.path(name), lambda tmp: Path(tmp).write_text(text))

    def read_json(self, name: str):
        path = self.path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, name: str, obj) -> None:
        _atomic_write(self.path(name), lambda tmp: torch.save(obj, tmp))

    def load(self, name: str):
        path = self.path(name)
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
