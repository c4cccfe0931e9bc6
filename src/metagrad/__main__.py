"""The ``metagrad`` command (also ``python -m metagrad``): process tuning first, then the command line.

libgomp reads its wait policy, and torch its huge-page switch (``METAGRAD_MALLOC=huge``), once, when
torch loads, so :func:`main` sets them before anything imports torch: this module and
``metagrad/__init__.py`` import none (``metagrad._openmp`` and ``metagrad._malloc`` explain the settings;
glibc's ``mallopt`` is called later, in :func:`metagrad.cli.main`, since it works at any time).
"""

from __future__ import annotations


def main() -> int:
    """Set OpenMP's wait policy and torch's huge pages (each with its switch), then run the command."""
    from metagrad import _malloc, _openmp

    _openmp.tune_wait()
    _malloc.request_huge_pages()
    from metagrad.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
