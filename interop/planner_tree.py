"""Prints what torch itself makes of a checkpoint's planner_data, to check `Checkpoint.paths()` and `readAll()`.

usage: python interop/planner_tree.py <ckpt>

Prints JSON {"paths": [[key, [str | int, ...]], ...], "tree": node}: every key of `.metadata` (in
state_dict_metadata order) with its planner_data path, and the nested state dict torch's own
`unflatten_state_dict` builds from planner_data with each value replaced by its flat key. A node is
{"leaf": key}, {"dict": [[name, node], ...]} (in order; a name is str() of the dict key, as a JS object holds it),
{"list": [node, ...]} (lists and tuples), or null (torch's padding of a list).
"""
import json
import sys

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._nested_dict import unflatten_state_dict


class Leaf:
    def __init__(self, key):
        self.key = key


def enc(v):
    if isinstance(v, Leaf):
        return {"leaf": v.key}
    if v is None:
        return None
    if isinstance(v, dict):
        return {"dict": [[str(k), enc(c)] for k, c in v.items()]}
    if isinstance(v, (list, tuple)):
        return {"list": [enc(c) for c in v]}
    raise TypeError(f"unexpected {type(v).__name__} in the unflattened tree")


def main():
    md = FileSystemReader(sys.argv[1]).read_metadata()
    keys = list(md.state_dict_metadata)
    tree = unflatten_state_dict({k: Leaf(k) for k in keys}, md.planner_data)
    print(json.dumps({"paths": [[k, list(md.planner_data[k])] for k in keys], "tree": enc(tree)}))


if __name__ == "__main__":
    main()
