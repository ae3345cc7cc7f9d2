"""``python -m hf_emergence``: the ``hf-emergence`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
