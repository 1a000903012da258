"""NeMo-RL's CheckpointManager retention and lookup logic, to compare distcp's CheckpointManager with.

The functions below are copied (text unchanged except where marked) from NVIDIA-NeMo/RL
`nemo_rl/utils/checkpoint.py` at commit 7ea279abfbeb698b092856d0dab61e7cf39bc909,
Copyright (c) 2025, NVIDIA CORPORATION, licensed under the Apache License, Version 2.0
(http://www.apache.org/licenses/LICENSE-2.0). Only the parts that need no torch/numpy/yaml/pydantic are taken:
`_load_checkpoint_history`, `remove_old_checkpoints`, `get_best_checkpoint_path`, `get_latest_checkpoint_path`,
`_rename_checkpoint`, `init_tmp_checkpoint`'s training_info writing.

Usage:
  python interop/nemo_rl_checkpoint.py simulate <run dir> <config json> <steps json>
      runs NeMo-RL's loop (init tmp → rename → remove_old_checkpoints) for [[step, training_info], …] and prints
      {"survivors": [...], "latest": ..., "best": ...}
  python interop/nemo_rl_checkpoint.py inspect <run dir> <config json>
      NeMo-RL's view of an existing run folder (one made by distcp): {"history": [...], "latest": ..., "best": ...}
"""

import glob
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, "os.PathLike[Any]"]


class CheckpointManager:
    # --- not NeMo-RL's text: a constructor that takes the config keys used below ---
    def __init__(self, config):
        self.checkpoint_dir = Path(config["checkpoint_dir"])
        self.metric_name = config["metric_name"]
        self.higher_is_better = config["higher_is_better"]
        self.keep_top_k = config["keep_top_k"]
        self.save_period = config["save_period"]
        self.ft_keep_latest_k = config.get("ft_keep_latest_k", None)

    # --- not NeMo-RL's text: init_tmp_checkpoint without torch/numpy/yaml ---
    def init_tmp_checkpoint(self, step, training_info):
        save_dir = self.checkpoint_dir / f"tmp_step_{step}"
        if save_dir.exists():
            shutil.rmtree(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        with open(save_dir / "training_info.json", "w") as f:
            json.dump(dict(training_info), f)
        return Path(os.path.abspath(save_dir))

    # --- NeMo-RL's text from here ---
    def _rename_checkpoint(self, checkpoint_path: PathLike) -> None:
        checkpoint_path = Path(checkpoint_path)
        step = checkpoint_path.name.split("_")[2]
        to_checkpoint_path = checkpoint_path.parent / f"step_{step}"
        if to_checkpoint_path.exists():
            old_checkpoint_path = checkpoint_path.parent / f"old_step_{step}"
            os.rename(to_checkpoint_path, old_checkpoint_path)
            os.rename(checkpoint_path, to_checkpoint_path)
            if old_checkpoint_path.exists():
                shutil.rmtree(old_checkpoint_path)
        else:
            os.rename(checkpoint_path, to_checkpoint_path)

    def finalize_checkpoint(self, checkpoint_path: PathLike) -> None:
        self._rename_checkpoint(checkpoint_path)
        self.remove_old_checkpoints()

    def remove_old_checkpoints(self, exclude_latest: bool = True) -> None:
        checkpoint_history = _load_checkpoint_history(self.checkpoint_dir)
        if not checkpoint_history:
            return
        if self.keep_top_k is None and self.ft_keep_latest_k is None:
            return

        latest_step = max(step for step, _, _ in checkpoint_history)
        protected_steps: set[int] = set()

        if exclude_latest:
            protected_steps.add(latest_step)

        periodic_history = [
            (s, p, m) for s, p, m in checkpoint_history if s % self.save_period == 0
        ]

        if self.keep_top_k is not None:
            if self.metric_name is None:
                periodic_history.sort(key=lambda x: x[0], reverse=True)
            else:
                if self.higher_is_better:
                    periodic_history.sort(
                        key=lambda x: (x[2].get(self.metric_name, -float("inf")), x[0]),
                        reverse=True,
                    )
                else:
                    periodic_history.sort(
                        key=lambda x: (x[2].get(self.metric_name, float("inf")), -x[0]),
                    )
            protected_steps.update(s for s, _, _ in periodic_history[: self.keep_top_k])
        else:
            protected_steps.update(s for s, _, _ in periodic_history)

        if self.ft_keep_latest_k is not None:
            by_step = sorted(checkpoint_history, key=lambda x: x[0], reverse=True)
            protected_steps.update(s for s, _, _ in by_step[: self.ft_keep_latest_k])

        for step, path, _ in checkpoint_history:
            if step not in protected_steps:
                shutil.rmtree(path)

    def get_best_checkpoint_path(self) -> Optional[str]:
        checkpoint_history = _load_checkpoint_history(self.checkpoint_dir)
        if len(checkpoint_history) == 0:
            return None
        valid_checkpoints = [c for c in checkpoint_history if self.metric_name in c[2]]
        if len(valid_checkpoints) == 0:
            return self.get_latest_checkpoint_path()
        if self.higher_is_better:
            valid_checkpoints.sort(
                key=lambda x: (x[2][self.metric_name], x[0]), reverse=True
            )
        else:
            valid_checkpoints.sort(key=lambda x: (x[2][self.metric_name], -x[0]))
        return str(valid_checkpoints[0][1])

    def get_latest_checkpoint_path(self) -> Optional[str]:
        step_dirs = [
            x
            for x in glob.glob(str(self.checkpoint_dir / "step_*"))
            if re.fullmatch(r"step_\d+", Path(x).name)
        ]
        step_dirs.sort(key=lambda x: int(Path(x).name.split("_")[1]))
        if len(step_dirs) == 0:
            return None
        return str(step_dirs[-1])


def _load_checkpoint_history(
    checkpoint_dir: Path,
) -> list[tuple[int, PathLike, dict[str, Any]]]:
    checkpoint_history: list[tuple[int, PathLike, dict[str, Any]]] = []
    step_dirs = [
        x
        for x in glob.glob(str(checkpoint_dir / "step_*"))
        if re.fullmatch(r"step_\d+", Path(x).name)
    ]
    for step_dir in step_dirs:
        info_file = Path(step_dir) / "training_info.json"
        if info_file.exists():
            with open(info_file) as f:
                info: dict[str, Any] = json.load(f)
                step = int(Path(step_dir).name.split("_")[1])
                checkpoint_history.append((step, step_dir, info))
    return checkpoint_history


# --- not NeMo-RL's text: the command line ---
def _name(p):
    return None if p is None else Path(p).name


def main():
    mode, run_dir, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    config["checkpoint_dir"] = run_dir
    mgr = CheckpointManager(config)
    if mode == "simulate":
        for step, info in json.loads(sys.argv[4]):
            mgr.finalize_checkpoint(mgr.init_tmp_checkpoint(step, info))
        survivors = sorted(int(p.split("_")[1]) for p in os.listdir(run_dir) if re.fullmatch(r"step_\d+", p))
        out = {"survivors": survivors}
    else:
        out = {
            "history": sorted(
                [[s, Path(p).name, i] for s, p, i in _load_checkpoint_history(Path(run_dir))], key=lambda x: x[0]
            )
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["latest"] = _name(mgr.get_latest_checkpoint_path())
        out["best"] = _name(mgr.get_best_checkpoint_path())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
