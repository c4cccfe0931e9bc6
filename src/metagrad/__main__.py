"""The ``metagrad`` command (also ``python -m metagrad``): process tuning first, then the command line.

libgomp reads its wait policy once, when torch loads it, so :func:`main` sets it before anything imports
torch: this module and ``metagrad/__init__.py`` import none (``metagrad._openmp`` explains the setting;
the C allocator is tuned later, in :func:`metagrad.cli.main`, since ``mallopt`` works at any time).
"""

from __future__ import annotations


def main() -> int:
    """Set OpenMP's wait policy (``METAGRAD_OMP_WAIT=default`` keeps libgomp's), then run the command."""
    from metagrad import _openmp

    _openmp.tune_wait()
    from metagrad.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
