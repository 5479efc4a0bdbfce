"""``python -m fmr1lib <command>``: see ``fmr1lib.cli``."""

from fmr1lib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
