"""``python -m sftjobs.steps STEP --run-dir DIR``: run one step of a run on this node (sftjobs.node.runtime)."""

from sftjobs.node.runtime import main

if __name__ == "__main__":
    raise SystemExit(main())
